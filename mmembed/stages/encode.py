"""Stage 3, encode: the model's forward pass, pooling and normalisation on a GPU actor pool.

The same class runs on CPU actors when no GPU is present. It loads the model once per actor,
re-collates the preprocessed rows it receives into batches of one signature, and does what
ST's `encode` does after `preprocess`: forward, optional truncation and normalisation.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import defaultdict

import numpy as np
import pyarrow as pa

from mmembed.media.device_decode import JPEG_KEY
from mmembed.models.batching import Budget, plan_batches, row_cost
from mmembed.models.device_use import STATS_COLUMN, DeviceUse
from mmembed.models.features import collate, feature_rows, signature
from mmembed.models.loading import ModelSpec, load_model, resolve_device

log = logging.getLogger(__name__)


QUANTIZED = ("int8", "uint8", "binary", "ubinary")
FLOAT_COLUMN = "embedding_float"
# How the encoder moves a batch to the GPU (--copy-mode): reused pinned buffers copied on a side
# stream, a fresh pinned copy per tensor, or a plain blocking `.to(device)`.
COPY_MODES = ("staged", "pinned", "plain")


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure: worth splitting the batch, unlike a bad record."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def stored_dim(dim: int, precision: str) -> int:
    """Values per stored vector: binary precisions pack 8 dimensions into a byte, as ST's quantize_embeddings."""
    return dim // 8 if precision in ("binary", "ubinary") else dim


def embedding_schema(dim: int, precision: str = "float32", keep_float: bool = False) -> pa.Schema:
    value_type = {
        "float16": pa.float16(), "int8": pa.int8(), "binary": pa.int8(), "uint8": pa.uint8(), "ubinary": pa.uint8(),
    }.get(precision, pa.float32())
    fields = [
        ("id", pa.string()),
        ("modality", pa.string()),
        ("embedding", pa.list_(value_type, stored_dim(dim, precision))),
    ]
    if keep_float:
        fields.append((FLOAT_COLUMN, pa.list_(pa.float32(), dim)))
    return pa.schema([*fields, ("stage", pa.string()), ("error", pa.string())])


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None) -> np.ndarray:
    """float32 [n, dim] to the stored precision with ST's own quantize_embeddings and the corpus-wide ranges."""
    if precision not in QUANTIZED:
        return vectors.astype(np.float16 if precision == "float16" else np.float32)
    from sentence_transformers.util.quantization import quantize_embeddings

    if not len(vectors):
        return np.zeros((0, stored_dim(vectors.shape[1], precision)), dtype=np.int8 if precision in ("int8", "binary") else np.uint8)
    return quantize_embeddings(vectors, precision, ranges=ranges)


def update_ranges(ranges: np.ndarray | None, vectors: np.ndarray) -> np.ndarray:
    """Running [2, dim] per-dimension (min, max), the calibration ST's quantize_embeddings does in one go."""
    block = np.vstack((vectors.min(axis=0), vectors.max(axis=0)))
    if ranges is None:
        return block
    return np.vstack((np.minimum(ranges[0], block[0]), np.maximum(ranges[1], block[1])))


class ModelStage:
    """What every model actor holds, the encoder's and the reranker's alike: one model load on its
    device, the batch budget, the counters and the columns carried through; and the batch loop:
    rows grouped by feature signature, length-sorted, batched within the budget, moved to the
    device with overlap, a failing batch split until only the offending row is an error row.
    Subclasses give the head (`embed`) and the output rows (`_output`)."""

    def __init__(self, model: ModelSpec, *, device: str = "auto", batch_size: int = 32,
                 max_batch_tokens: int | None = None, max_batch_patches: int | None = None,
                 passthrough: tuple[str, ...] = (), copy_mode: str = "staged", pixel_frames: bool = False):
        import torch

        self.torch = torch
        self.passthrough = tuple(passthrough)  # input columns copied to the output row for row
        self.device = resolve_device(device)
        self.model = load_model(model, weights=True, device=self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.forward_kwargs = {}
        self.budget = Budget(batch_size, max_batch_tokens, max_batch_patches)
        # Real and padded token positions computed so far, for the padding-waste figure.
        self.token_counts = [0, 0]
        # Ray may run several calls at once on this actor's threads (--calls-per-encoder).
        self._counts_lock = threading.Lock()
        if copy_mode not in COPY_MODES:
            raise ValueError(f"copy_mode {copy_mode!r} is not one of {COPY_MODES}")
        self.copy_mode = copy_mode
        self._staging = None
        from mmembed.models.staging import CallStreams

        # Concurrent calls (--calls-per-encoder) each on a CUDA stream of their own, so they overlap on the device.
        self.streams = CallStreams.for_device(self.model.device)
        if self.model.device.type == "cuda" and copy_mode == "staged":
            from mmembed.models.staging import PinnedStaging

            self._staging = PinnedStaging(self.model.device)
        # Time in forward over wall time, utilisation and memory, for the run's manifest.
        self.device_use = DeviceUse(self.model.device, actor=uuid.uuid4().hex[:12])
        self._jpeg_decoder = None  # --decode-on-device: JPEG bytes decoded on the GPU
        from mmembed.media.device_decode import image_processor
        from mmembed.models.pixel_tail import tail_of

        # uint8 pixels from the CPU pool get the processor's rescale and normalise here, on the device;
        # Qwen-VL frames (the plan's model.pixels.layout "frames") are first cut into the processor's patches.
        self.image_processor = image_processor(self.model)
        self.pixel_tail = tail_of(self.image_processor)[0]
        self.pixel_frames = pixel_frames

    def _set_padding(self, tokenizer):
        """collate pads as the model's tokenizer does (ST sets left padding on load for causal models)."""
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap their tokenizer
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.padding_side = getattr(tokenizer, "padding_side", None) or "right"

    def _compile(self):
        """torch.compile each top-level submodule of the transformers models.

        ST calls model methods other than `forward` (CLIP's `get_image_features`); compiling the
        submodules those methods call (vision tower, text tower, language model) covers them all.
        """
        for module in self.model.modules():
            inner = getattr(module, "model", None)
            if isinstance(inner, self.torch.nn.Module) and hasattr(inner, "config"):
                for child in inner.children():
                    if any(True for _ in child.parameters()):
                        child.compile(dynamic=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.streams.stream():
            return self._call(batch)

    def _call(self, batch: pa.Table) -> pa.Table:
        call = self.device_use.call_started()
        rows = feature_rows(batch)
        carried = [batch.column(name) for name in self.passthrough]
        embeddings: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            if row["error"] is None:
                groups[signature(row)].append(i)
        pending: list[tuple[list[int], object]] = []
        for idxs in groups.values():
            # Length-sorted batches waste less compute on padding, as in ST's encode; a token
            # budget (when set) also bounds each batch's padded size.
            costs = [row_cost(rows[i]) for i in idxs]
            for batch in plan_batches(costs, self.budget):
                self._count_tokens([costs[j] for j in batch])
                self._encode_chunk(rows, [idxs[j] for j in batch], pending, errors)
        # Results stay on the device until every batch is queued: the host collates the next
        # batch while the GPU runs the previous one, and waits once per call.
        for idxs, emb in pending:
            self._collect(rows, idxs, emb, embeddings, errors)
        self.device_use.call_finished(call)
        out = self._output(rows, embeddings, errors)
        for name, column in zip(self.passthrough, carried):
            out = out.append_column(name, column)
        return self._with_stats(out)

    def _with_stats(self, out: pa.Table) -> pa.Table:
        stats = [None] * out.num_rows
        if stats:
            with self._counts_lock:
                snapshot = {**self.device_use.snapshot(), "tokens": list(self.token_counts)}
            stats[0] = json.dumps(snapshot)
        return out.append_column(STATS_COLUMN, pa.array(stats, pa.string()))

    def _count_tokens(self, costs):
        lengths = [c[0] for c in costs]
        with self._counts_lock:
            self.token_counts[0] += sum(lengths)
            self.token_counts[1] += len(lengths) * max(lengths, default=0)

    @property
    def padding_waste(self) -> float:
        real, padded = self.token_counts
        return 1.0 - real / padded if padded else 0.0

    def _encode_chunk(self, rows, idxs, pending, errors):
        """Queue one batch's forward; a batch that fails is split until the offending record fails alone.

        Out of device memory, the batch is halved (and the allocator's cache released) until the
        halves fit, so a budget set too high costs retries, not records; any other failure is
        isolated record by record. Only a record that fails on its own becomes an error row.
        """
        try:
            emb = self.embed(self.features([rows[i] for i in idxs]))
        except Exception as exc:  # noqa: BLE001 - isolate the offending record below
            # Without its traceback, whose frames hold the failed batch's tensors: retries need that memory.
            failure = exc.with_traceback(None)
        else:
            pending.append((idxs, emb))
            return
        self._split(rows, idxs, failure, errors, lambda part: self._encode_chunk(rows, part, pending, errors))

    def _collect(self, rows, idxs, emb, embeddings, errors):
        """Bring one queued batch's results to the host.

        CUDA reports some failures only when the host waits for the results, out of memory among
        them: such a batch is run again here, split as at queue time, each part collected at once.
        """
        try:
            vectors = self._to_host(emb)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise  # an asynchronous device fault leaves the context unusable: let the actor restart
            failure = exc.with_traceback(None)
        else:
            for i, v in zip(idxs, vectors):
                embeddings[i] = v
            return

        def again(part):
            queued: list = []
            self._encode_chunk(rows, part, queued, errors)
            for sub, sub_emb in queued:
                self._collect(rows, sub, sub_emb, embeddings, errors)

        self._split(rows, idxs, failure, errors, again)

    def _split(self, rows, idxs, exc, errors, retry):
        if len(idxs) == 1:
            errors[idxs[0]] = f"encode failed: {type(exc).__name__}: {exc}"
            return
        if is_out_of_memory(exc):
            self.device_use.out_of_memory()
            self._release_memory()
            half = len(idxs) // 2
            parts = [idxs[:half], idxs[half:]]
        else:
            parts = [[i] for i in idxs]
        for part in parts:
            retry(part)

    def _release_memory(self):
        if self.model.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def forward(self, rows: list[dict]) -> np.ndarray:
        """Collate rows of one signature and run ST's forward, pooling and normalisation."""
        return self._to_host(self.embed(self.features(rows)))

    def features(self, rows: list[dict]) -> dict:
        """Rows of one signature as the model's input on its device: collated and copied, or, for
        JPEGs left to this stage (--decode-on-device), decoded and preprocessed on the device."""
        if rows[0]["feat_keys"] == [JPEG_KEY]:
            if self._jpeg_decoder is None:
                raise RuntimeError("a JPEG row reached an encoder without --decode-on-device")
            return self._jpeg_decoder([r["feat_data"][0] for r in rows], self.model.device)
        features = self.to_device(self.collate(rows))
        pixels = features.get("pixel_values")
        if pixels is not None and pixels.dtype == self.torch.uint8:
            if self.pixel_tail is None:
                raise RuntimeError("uint8 pixel_values reached an encoder whose model has no image processor tail")
            if self.pixel_frames:
                from mmembed.models.pixel_layout import unfold

                pixels = unfold(pixels, features["image_grid_thw"], self.image_processor)
            features["pixel_values"] = self.pixel_tail.apply(pixels)
        return features

    def collate(self, rows: list[dict]) -> dict:
        return collate(rows, pad_token_id=self.pad_token_id, padding_side=self.padding_side)

    def to_device(self, features: dict) -> dict:
        """Move collated features to the model's device, by --copy-mode.

        staged: each tensor is copied into a pinned host buffer this actor keeps and reuses (sized
        by class), then to the device on a side stream that the compute stream waits on, so the
        copy overlaps the host's work on the next batch and no batch pays for pinning fresh memory.
        pinned: a freshly pinned copy per tensor, non-blocking. plain: a blocking `.to(device)`.
        """
        from sentence_transformers.util import batch_to_device

        device = self.model.device
        if device.type != "cuda" or self.copy_mode == "plain":
            return batch_to_device(features, device)
        torch = self.torch
        if self._staging is not None:
            return {k: self._staging.to_device(v) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        return {
            k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in features.items()
        }

    def embed(self, features: dict):
        raise NotImplementedError

    @staticmethod
    def _to_host(emb) -> np.ndarray:
        return emb.float().cpu().numpy()

    def _output(self, rows, results, errors) -> pa.Table:
        raise NotImplementedError


class EncodeStage(ModelStage):
    """GPU (or CPU) actor: feature rows in, embedding rows out; error rows pass through."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        device: str = "auto",
        batch_size: int = 32,
        task: str | None = None,
        normalize: bool = False,
        truncate_dim: int | None = None,
        precision: str = "float32",
        ranges: list | None = None,
        keep_float: bool = False,
        max_batch_tokens: int | None = None,
        max_batch_patches: int | None = None,
        compile: bool = False,
        passthrough: tuple[str, ...] = (),
        copy_mode: str = "staged",
        decode_on_device: bool = False,
        device_decoder: str = "torchvision",
        hw_decode_share: float | None = None,
        pixel_frames: bool = False,
    ):
        super().__init__(model, device=device, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                         max_batch_patches=max_batch_patches, passthrough=passthrough, copy_mode=copy_mode,
                         pixel_frames=pixel_frames)
        if decode_on_device:
            from mmembed.media.device_decode import DeviceImageDecoder

            share = {} if hw_decode_share is None else {"hw_share": hw_decode_share}
            self._jpeg_decoder = DeviceImageDecoder(self.model, decoder=device_decoder, **share)
        self.forward_kwargs = {"task": task} if task else {}
        self.normalize = normalize
        self.truncate_dim = truncate_dim if truncate_dim is not None else getattr(self.model, "truncate_dim", None)
        self.precision = precision
        # int8/uint8 buckets come from the whole corpus's calibration, never from a batch (see mmembed/jobs/embed.py).
        self.ranges = np.asarray(ranges, dtype=np.float32) if ranges is not None else None
        self.keep_float = keep_float
        self._set_padding(getattr(self.model, "tokenizer", None))
        dim = self.model.get_embedding_dimension()
        self.dim = min(dim, self.truncate_dim) if self.truncate_dim else dim
        self.schema = embedding_schema(self.dim, precision, keep_float)
        if compile:
            self._compile()

    def embed(self, features: dict):
        """ST's forward, truncation and normalisation on features already on the device.

        The result stays on the device; this is the whole GPU-side work of the stage, which the
        GPU benchmark times on its own as the forward-only ceiling.
        """
        torch = self.torch
        with torch.inference_mode(), self.device_use.forward():
            out = self.model(dict(features), **self.forward_kwargs)
            emb = out["sentence_embedding"]
            if self.truncate_dim:
                emb = emb[..., : self.truncate_dim]
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            return emb

    def _output(self, rows, embeddings, errors) -> pa.Table:
        n = len(rows)
        flat = np.zeros((n, self.dim), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        stage, error = [], []
        for i, row in enumerate(rows):
            if i in embeddings:
                flat[i] = embeddings[i]
                valid[i] = True
                stage.append(None)
                error.append(None)
            elif i in errors:
                stage.append("encode")
                error.append(errors[i])
            else:
                stage.append(row["stage"])
                error.append(row["error"])
        stored = quantize(flat, self.precision, self.ranges)
        mask = pa.array(~valid)
        columns = {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "modality": pa.array([r["modality"] for r in rows], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), stored.shape[1], mask=mask),
        }
        if self.keep_float:
            columns[FLOAT_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), self.dim, mask=mask)
        columns["stage"] = pa.array(stage, pa.string())
        columns["error"] = pa.array(error, pa.string())
        return pa.table(columns, schema=self.schema)

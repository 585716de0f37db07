"""Stage 2, preprocess: fetch, decode and run ST's `preprocess()` on a CPU actor pool.

Each actor loads the model's processor once (weights stay on the meta device, so a 2B model
costs no memory here) and turns every record into the exact features ST would build for it.
A record that cannot be fetched, decoded or processed becomes an error row with its reason;
the batch goes on.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from mmembed.inputs.discover import MEDIA_MODALITIES
from mmembed.media.av import default_decoders, prepare_for_st
from mmembed.media.decode import (
    DecodeError,
    decode_image,
    decode_jpeg_tensor,
    decode_png_tensor,
    decode_text,
    plain_png,
    reuse_image_memory,
)
from mmembed.media.device_decode import encoded_row, jpeg_for_device
from mmembed.models.features import FEATURE_FIELDS, pack, same_features, split_batch
from mmembed.models.loading import ModelSpec, label_modality, load_model, modality_label, resolve_prompt
from mmembed.storage.fetch import Fetcher, FetchError

log = logging.getLogger(__name__)

PREPROCESSED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("modality", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        *FEATURE_FIELDS,
    ]
)


class RecordError(Exception):
    """This record, not the job, is at fault."""


class PreprocessStage:
    """CPU actor: records in, processor-ready feature rows (or error rows) out."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        task: str | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        storage_options: dict | None = None,
        max_bytes: int = 256 * 1024 * 1024,
        max_image_pixels: int = 89_478_485,
        allow_http: bool = False,
        http_timeout_s: float = 30.0,
        transport_dtype: str | None = None,
        decoders: dict | None = None,
        fetch_threads: int = 8,
        passthrough: tuple[str, ...] = (),
        decode_on_device: bool = False,
        pdf_dpi: float | None = None,
        max_pages: int | None = None,
        skip=None,
        uint8_pixels: bool = False,
        pixel_frames: bool = False,
        fast_decode_edge: int | None = None,
    ):
        self.spec = model
        # Image-only records whose JPEG the encoder can decode on its device leave here as bytes.
        self.decode_on_device = decode_on_device
        # Input columns copied to the output unchanged (row i out is record i in): reembed's content hash.
        self.passthrough = tuple(passthrough)
        self.model = load_model(model, weights=False)
        from mmembed.media.device_decode import image_processor
        from mmembed.models import pixel_layout

        ip = image_processor(self.model)
        # The processor takes decoded RGB pixels as channel-first views, not copies, where that gives the
        # same features (checked once, here; mmembed/models/pixel_layout.py).
        self.channels_last = pixel_layout.channels_last_exact(self.model)
        if self.channels_last:
            pixel_layout.keep_channels_last(ip)
        # Plain JPEGs decoded straight into the tensor a fast processor works on, where that gives this
        # model's preprocess the same features as the Pillow image (checked once, here).
        self.jpeg_tensors = jpeg_tensors_equal(self.model, max_image_pixels)
        # Likewise plain 8-bit RGB PNGs (screenshots), decoded by libpng.
        self.png_tensors = jpeg_tensors_equal(self.model, max_image_pixels, "PNG")
        # Pixels leave as uint8 and the encoder rescales and normalises them (checked exact at plan time).
        self.uint8_pixels = uint8_pixels
        # --fast-decode: large JPEGs decoded in the DCT domain down to (not below) this shorter side.
        self.fast_decode_edge = fast_decode_edge
        if fast_decode_edge:
            self.jpeg_tensors = False  # the tensor route decodes at full size
        if uint8_pixels:
            ip.do_rescale, ip.do_normalize = False, False
            if pixel_frames:  # Qwen-VL: resized frames, patchified on the encoder's device (checked at plan time)
                pixel_layout.ship_frames(ip)
        self.task = task
        self.prompt = resolve_prompt(self.model, task, prompt_name, prompt)
        self.fetcher = Fetcher(storage_options, max_bytes=max_bytes, allow_http=allow_http, http_timeout_s=http_timeout_s)
        self.max_image_pixels = max_image_pixels
        reuse_image_memory()
        self.transport_dtype = transport_dtype
        # torchcodec audio/video decoders bound to this model's processor; callers may override.
        self.decoders = {**default_decoders(self.model), **(decoders or {})}
        # modality label -> whether one processor call may serve many records (see _preprocess_together)
        self._batching: dict[str, bool] = {}
        # Fetching waits on storage and Pillow/torchcodec decode without the GIL, so the records
        # of a batch are fetched and decoded by a thread pool; the processor call stays one per batch.
        self._threads = ThreadPoolExecutor(fetch_threads, thread_name_prefix="fetch") if fetch_threads > 1 else None
        # PDFs: pages rendered at the size this model's processor keeps (mmembed/media/pdf.py).
        from mmembed.media.pdf import render_target

        self.render_target = render_target(self.model, model.processor_kwargs, pdf_dpi)
        self.max_pages = max_pages
        # Committed records of an earlier attempt (a KeyIndex, or an IndexRef on Ray): their pages
        # are not rendered again.
        self.skip = skip

    def __call__(self, batch: pa.Table):
        """The batch's feature rows: one table, or for a batch holding PDFs, a generator of tables of
        at most a batch's worth of pages each (Ray Data and the local executor take either), so a
        300-page document never sits in memory, or in one block, whole."""
        rows = batch.to_pylist()
        if any(r.get("pdf_uri") is not None or r.get("pdf_bytes") is not None for r in rows):
            return self._page_tables(rows, {name: batch.schema.field(name).type for name in self.passthrough})
        return self._process(rows, None, batch)

    def _page_tables(self, rows: list[dict], types: dict):
        pages, step = self._pages(rows), max(len(rows), 1)
        while chunk := list(itertools.islice(pages, step)):
            yield self._process(chunk, types)

    def _pages(self, rows: list[dict]):
        """Records, with each PDF record replaced by its pages (ids `<id>#page=<n>`) or its error row."""
        from mmembed.inputs.discover import CELL_ERROR, PAGE_MARK
        from mmembed.media.pdf import DocumentError, render_pages

        index = self.skip.get() if hasattr(self.skip, "get") else self.skip
        for row in rows:
            if row.get("pdf_uri") is None and row.get("pdf_bytes") is None:
                yield row
                continue
            carried = {name: row.get(name) for name in self.passthrough}
            doc = row["id"]
            try:
                data = row["pdf_bytes"] if row.get("pdf_bytes") is not None else self.fetcher.fetch(row["pdf_uri"])

                def done(n, doc=doc):
                    return index is not None and bool(index.lookup([f"{doc}{PAGE_MARK}{n}"])[0][0])

                for n, image, why in render_pages(data, self.render_target, max_pages=self.max_pages,
                                                  max_image_pixels=self.max_image_pixels, done=done):
                    yield {"id": f"{doc}{PAGE_MARK}{n}", "image_page": image, CELL_ERROR: why, **carried}
            except (DocumentError, FetchError) as exc:
                yield {"id": doc, "pdf_uri": row.get("pdf_uri") or "", CELL_ERROR: f"PDF {doc}: {exc}", **carried}
            except Exception as exc:  # noqa: BLE001 - one document never kills the job
                yield {"id": doc, "pdf_uri": row.get("pdf_uri") or "", CELL_ERROR: f"PDF {doc}: {_reason(exc)}",
                       **carried}

    def _process(self, rows: list[dict], types: dict | None, batch: pa.Table | None = None) -> pa.Table:
        """Feature rows (or error rows) for records; passthrough columns from `batch` when rows are its rows."""
        results: list[tuple[dict | None, str | None]] = [(None, None)] * len(rows)
        batchable: dict[str, list[tuple[int, object]]] = defaultdict(list)
        built = self._threads.map(self._input_of, rows) if self._threads and len(rows) > 1 else map(self._input_of, rows)
        for i, (st_input, label, processing_kwargs, error) in enumerate(built):
            if error is not None:
                results[i] = (None, error)
                continue
            if isinstance(st_input, _DeviceJpeg):
                results[i] = (encoded_row(st_input.data), None)
                continue
            if processing_kwargs is None and self._batching.get(label, True):
                batchable[label].append((i, st_input))
                continue
            try:
                results[i] = (pack(self._call([st_input], processing_kwargs), self.transport_dtype, self.uint8_pixels), None)
            except Exception as exc:  # noqa: BLE001 - never let one record kill the job
                results[i] = (None, _reason(exc))
        for label, items in batchable.items():
            self._preprocess_together(label, items, results)

        out = {f.name: [] for f in PREPROCESSED_SCHEMA}
        for row, (packed, error) in zip(rows, results):
            out["id"].append(row.get("id"))
            out["modality"].append(_row_label(row))
            out["stage"].append(None if error is None else "preprocess")
            out["error"].append(error)
            for name, _ in FEATURE_FIELDS:
                out[name].append(packed[name] if packed else ([] if name != "feat_meta" else None))
        table = pa.table(out, schema=PREPROCESSED_SCHEMA)
        for name in self.passthrough:
            col = batch.column(name) if batch is not None else pa.array([r.get(name) for r in rows], types[name])
            table = table.append_column(name, col)
        return table

    def _preprocess_together(self, label: str, items: list, results: list) -> None:
        """One processor call for records of one modality, split back into records.

        Processors are far faster on a batch than record by record. The split is checked against
        record-by-record processing the first time a modality is seen; a processor whose batch
        output differs or cannot be split (VLMs concatenate patches) stays record by record.
        """
        per_record = None
        if len(items) > 1 and self._batching.get(label, True):
            try:
                per_record = split_batch(self._call([x for _, x in items], None), len(items))
            except Exception:  # noqa: BLE001 - retried one by one below, which names the bad record
                per_record = None
            if per_record is not None and label not in self._batching:
                probe = [self._call([x], None) for _, x in items[:2]]
                self._batching[label] = all(same_features(a, b) for a, b in zip(per_record, probe))
                if not self._batching[label]:
                    per_record = None
            elif per_record is None and label not in self._batching:
                self._batching[label] = False
        for k, (i, st_input) in enumerate(items):
            try:
                features = per_record[k] if per_record is not None else self._call([st_input], None)
                results[i] = (pack(features, self.transport_dtype, self.uint8_pixels), None)
            except Exception as exc:  # noqa: BLE001
                results[i] = (None, _reason(exc))

    # -- one record -----------------------------------------------------------------------
    def _input_of(self, row: dict):
        """(ST input, modality label, processing kwargs, None), or (None, None, None, reason)."""
        try:
            st_input, label = self._build_input(row)
            self._check_supported(label)
            if isinstance(st_input, _DeviceJpeg):
                return st_input, label, None, None
            st_input, processing_kwargs = self._prepare(st_input)
            return st_input, label, processing_kwargs, None
        except Exception as exc:  # noqa: BLE001 - never let one record kill the job
            return None, None, None, _reason(exc)

    def _build_input(self, row: dict):
        """The ST input for a record: a string, a PIL image, a dict of modalities or messages."""
        if row.get("cell_error"):
            raise RecordError(row["cell_error"])
        parts: dict = {}
        text = row.get("text")
        if text is None and row.get("text_uri") is not None:
            text = decode_text(self.fetcher.fetch(row["text_uri"]))
        if text is not None:
            if not text.strip():
                raise RecordError("empty text")
            parts["text"] = text
        for m in MEDIA_MODALITIES:
            value = self._media(row, m, device_ok=self.decode_on_device)
            if value is not None:
                parts[m] = value
        if len(parts) > 1 and isinstance(parts.get("image"), (_DeviceJpeg, _PlainJpeg, _PlainPng)):
            # Only a record that is one photo goes to the device whole, or as a tensor; in a combined record
            # the image is a Pillow image, as ST takes it there.
            parts["image"] = decode_image(parts["image"].data, max_pixels=self.max_image_pixels)
        elif isinstance(parts.get("image"), _PlainJpeg):
            parts["image"] = decode_jpeg_tensor(parts["image"].data)
        elif isinstance(parts.get("image"), _PlainPng):
            parts["image"] = decode_png_tensor(parts["image"].data)
        messages = row.get("messages")
        if messages is not None:
            if parts:
                raise RecordError("a record with `messages` cannot also set text/image/audio/video cells")
            return self._messages(messages), "message"
        if not parts:
            raise RecordError("empty record: no text, image, audio or video")
        label = "+".join(sorted(parts))
        if len(parts) == 1:
            return next(iter(parts.values())), label
        return parts, label

    def _media(self, row: dict, modality: str, device_ok: bool = False):
        if modality == "image" and row.get("image_page") is not None:
            return row["image_page"]  # a PDF page, rendered above
        uri, data, struct = row.get(f"{modality}_uri"), row.get(f"{modality}_bytes"), row.get(f"{modality}_struct")
        if uri is None and data is None and struct is None:
            return None
        if struct is not None and modality in self.decoders:
            return self.decoders[modality](struct=struct, row=row)
        if data is None:
            data = self.fetcher.fetch(uri)
        elif not data:
            raise RecordError(f"zero-byte {modality} cell")
        if modality == "image":
            plain = (device_ok or self.jpeg_tensors) and jpeg_for_device(data, max_pixels=self.max_image_pixels)
            if plain and device_ok:
                return _DeviceJpeg(data)
            if plain:
                return _PlainJpeg(data)
            if self.png_tensors and plain_png(data, max_pixels=self.max_image_pixels):
                return _PlainPng(data)
            decode = lambda: decode_image(data, max_pixels=self.max_image_pixels,  # noqa: E731
                                          draft_edge=self.fast_decode_edge)
        else:
            decoder = self.decoders.get(modality)
            if decoder is None:
                raise RecordError(f"{modality} decoding is not available in this build")
            decode = lambda: decoder(data=data, row=row)  # noqa: E731
        try:
            return decode()
        except DecodeError as exc:
            if uri is None:
                raise
            raise DecodeError(f"{exc}: {uri}") from None  # which object, when the bytes came from a URI

    def _messages(self, messages):
        """Chat messages with their media parts fetched and decoded like cells of a record.

        `messages` is a list of {role, content}; content is a string or a list of parts
        {type, text | image | audio | video}, media given as a URI/path, bytes, or (audio) a struct.
        """
        if not isinstance(messages, list) or not messages:
            raise RecordError("`messages` must be a non-empty list of {role, content}")
        out = []
        for message in messages:
            if not isinstance(message, dict) or message.get("role") is None or message.get("content") is None:
                raise RecordError("every message needs a role and a content")
            content = message["content"]
            if isinstance(content, list):
                content = [self._message_part(part) for part in content]
            out.append({"role": message["role"], "content": content})
        return out

    def _message_part(self, part: dict) -> dict:
        kind = part.get("type")
        if kind == "text":
            return {"type": "text", "text": part.get("text") or ""}
        if kind not in MEDIA_MODALITIES:
            raise RecordError(f"unknown message part type {kind!r} (expected text, image, audio or video)")
        value = part.get(kind)
        if value is None:
            raise RecordError(f"message part of type {kind!r} has no {kind!r} value")
        # Reuse the record path: a part is a one-cell record of its modality.
        cell = "_struct" if isinstance(value, dict) else ("_bytes" if isinstance(value, bytes) else "_uri")
        media = self._media({f"{kind}{cell}": value}, kind)
        if isinstance(media, (_PlainJpeg, _PlainPng, _DeviceJpeg)):
            # Inside messages ST takes a Pillow image, as in a combined record.
            media = decode_image(media.data, max_pixels=self.max_image_pixels)
        return {"type": kind, kind: media}

    def _check_supported(self, label: str) -> None:
        modality = label_modality(label)
        if not self.model.supports(modality):
            # Past the up-front sample of plan(), a combination is only found here, per record.
            fix = (
                "; it cannot embed modalities together (no `message` support): rerun with --split-modalities "
                "to embed each modality on its own, or use a model that supports messages (e.g. a Qwen3-VL embedder)"
                if isinstance(modality, tuple)
                else ""
            )
            raise RecordError(
                f"model {self.spec.name_or_path} does not support {modality_label(modality)} records "
                f"(it supports: {', '.join(modality_label(m) for m in self.model.modalities)}){fix}"
            )

    def _prepare(self, st_input):
        return prepare_for_st(st_input)

    def _call(self, st_inputs: list, processing_kwargs: dict | None) -> dict:
        kwargs = {"task": self.task} if self.task else {}
        if processing_kwargs:
            kwargs["processing_kwargs"] = processing_kwargs
        return self.model.preprocess(st_inputs, prompt=self.prompt, **kwargs)


def jpeg_tensors_equal(model, max_pixels: int, image_format: str = "JPEG") -> bool:
    """Whether this model's preprocess gives a [3, H, W] uint8 tensor decoded from a plain JPEG (or PNG) the
    same features as the Pillow image of the same file (a fast processor: it converts the image to that
    tensor)."""
    import io

    import numpy as np
    from PIL import Image

    from mmembed.models.features import same_features

    try:
        rng = np.random.default_rng(5)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)).save(buf, format=image_format,
                                                                                 quality=92)
        data = buf.getvalue()
        png = image_format == "PNG"
        plain = plain_png(data, max_pixels=max_pixels) if png else jpeg_for_device(data, max_pixels=max_pixels)
        if not model.supports("image") or not plain:
            return False
        want = model.preprocess([decode_image(data, max_pixels=max_pixels)])
        got = model.preprocess([decode_png_tensor(data) if png else decode_jpeg_tensor(data)])
        return same_features(got, want, exact=True)
    except Exception:  # noqa: BLE001 - any doubt keeps Pillow
        return False


class _PlainJpeg:
    """A plain baseline RGB JPEG's bytes, decoded to a tensor once the record is known to be one image."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class _PlainPng:
    """A plain 8-bit RGB PNG's bytes, decoded to a tensor once the record is known to be one image."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class _DeviceJpeg:
    """A photo's bytes, left for the encoder to decode on its device (--decode-on-device)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def _reason(exc: Exception) -> str:
    if isinstance(exc, (RecordError, FetchError, DecodeError)):
        return str(exc)
    return f"preprocess failed: {type(exc).__name__}: {exc}"


def _row_label(row: dict) -> str:
    from mmembed.inputs.discover import record_modality

    label = record_modality(row)
    return label or "empty"

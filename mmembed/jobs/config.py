"""One typed, frozen configuration per job.

The entry points parse the command line; `from_args` turns the parsed arguments into one of
these, in one place, and nothing under `mmembed/` sees an `argparse.Namespace`. A job that runs
another (search embeds raw queries, retrieve-rerank runs three jobs) builds that job's
configuration with `derive`, never by parsing its command line again. The defaults here are the
parsers' defaults (tests/test_config.py holds them equal).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping, TypeVar

from mmembed.media.device_decode import HW_DECODE_SHARE

C = TypeVar("C")


def _empty() -> dict:
    return {}


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    model: str | None = None
    revision: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=_empty)
    processor_kwargs: Mapping[str, Any] = field(default_factory=_empty)
    trust_remote_code: bool = False

    def model_spec(self, kind: str = "embedder"):
        """What an actor needs to load the model: name, revision and kwargs."""
        from mmembed.models.loading import ModelSpec

        return ModelSpec(self.model, revision=self.revision, trust_remote_code=self.trust_remote_code,
                         model_kwargs=dict(self.model_kwargs), processor_kwargs=dict(self.processor_kwargs),
                         kind=kind)


@dataclass(frozen=True, kw_only=True)
class ComputeOptions:
    address: str | None = field(default_factory=lambda: os.environ.get("RAY_ADDRESS"))
    device: str = "auto"
    batch_size: int = 32
    num_encoders: int | None = None
    calls_per_encoder: int | None = None
    copy_mode: str = "staged"
    num_preprocessors: int | None = None
    preprocess_batch_size: int = 16
    gpus_per_encoder: float = 1.0
    cpus_per_encoder: float | None = None
    cpus_per_preprocessor: float | None = None
    memory_per_preprocessor: int | None = None
    encoder_resources: Mapping[str, float] = field(default_factory=_empty)
    preprocessor_resources: Mapping[str, float] = field(default_factory=_empty)
    transport_dtype: str | None = None
    max_batch_tokens: int | None = None
    max_batch_patches: int | None = None
    encode_window: int | None = None
    compile: bool = False
    executor: str = "auto"
    placement_timeout: float = 600.0


@dataclass(frozen=True, kw_only=True)
class StorageOptions:
    storage_options: Mapping[str, Any] = field(default_factory=_empty)
    allow_http: bool = False
    http_timeout: float = 30.0
    max_bytes: int = 256 * 2**20
    fetch_threads: int = 8
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit
    shard_rows: int = 50_000
    max_error_fraction: float = 1.0


@dataclass(frozen=True, kw_only=True)
class EmbeddingOptions:
    task: str | None = None
    prompt_name: str | None = None
    prompt: str | None = None
    normalize: bool = False
    truncate_dim: int | None = None
    precision: str = "float32"
    calibration_records: int = 1000
    calibration_embeddings: str | None = None
    keep_float: bool = False
    on_unsupported: str = "fail"
    token_pool_factor: float | None = None
    token_pool_protected: int = 1


@dataclass(frozen=True, kw_only=True)
class InputOptions:
    """Which manifest column is which, and which modalities of a record to embed."""

    id_column: str = "id"
    text_column: str = "text"
    image_column: str = "image"
    audio_column: str = "audio"
    video_column: str = "video"
    modalities: tuple[str, ...] | None = None
    pdf_dpi: float | None = None
    max_pages: int | None = None

    def columns(self):
        from mmembed.inputs.discover import Columns

        return Columns(id=self.id_column, text=self.text_column, image=self.image_column, audio=self.audio_column,
                       video=self.video_column, modalities=tuple(self.modalities) if self.modalities else None)


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(ModelOptions, EmbeddingOptions, InputOptions, ComputeOptions, StorageOptions):
    input: str
    output: str
    overwrite: bool = False
    retry_errors: bool = False
    lease_seconds: float = 60.0
    split_modalities: bool = False
    decode_on_device: bool = False
    device_decoder: str = "auto"
    hw_decode_share: float = HW_DECODE_SHARE
    fast_decode: bool = False


@dataclass(frozen=True, kw_only=True)
class RerankConfig(ModelOptions, ComputeOptions, StorageOptions):
    candidates: str
    output: str
    corpus: str | None = None
    queries: str | None = None
    on_unsupported: str = "fail"
    top_k: int | None = None
    prompt_name: str | None = None
    prompt: str | None = None
    overwrite: bool = False
    shuffle_partitions: int | None = None
    lease_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True)
class SearchConfig(ModelOptions, ComputeOptions, StorageOptions):
    queries: str
    output: str
    top_k: int
    corpus_embeddings: str | None = None
    prompt_name: str | None = None
    prompt: str | None = None
    query_batch_size: int = 1024
    corpus_block_rows: int = 16_384
    rescore_multiplier: int = 4
    overwrite: bool = False
    index: str | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    candidate_tokens: int | None = None
    lease_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True)
class ReembedConfig(ModelOptions, EmbeddingOptions, InputOptions, ComputeOptions, StorageOptions):
    input: str
    store: str
    activate: bool = False
    activate_if_better: bool = False
    queries: str | None = None
    qrels: str | None = None
    metric: str = "ndcg@10"
    min_gain: float = 0.0
    full: bool = False
    wait: bool = False
    wait_timeout: float | None = None
    lease_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(ComputeOptions, StorageOptions):
    root: str
    queries: str
    qrels: str
    version: str | None = None
    snapshot: str | None = None
    json: str | None = None
    k: tuple[int, ...] = (1, 3, 5, 10, 100)
    recompute: bool = False
    work_dir: str | None = None
    query_batch_size: int | None = None
    corpus_block_rows: int | None = None
    trust_remote_code: bool = False
    lease_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    embeddings: str
    output: str
    storage_options: Mapping[str, Any] = field(default_factory=_empty)
    kind: str | None = None
    nlist: int | None = None
    nprobe: int | None = None
    m: int | None = None
    nbits: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    train_size: int | None = None
    overwrite: bool = False
    lease_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True)
class RetrieveRerankConfig(ComputeOptions, StorageOptions):
    queries: str
    corpus: str
    output: str
    embedder: str
    reranker: str
    trust_remote_code: bool = False
    corpus_embeddings: str | None = None
    retrieve_k: int = 50
    top_k: int = 10
    overwrite: bool = False
    lease_seconds: float = 60.0


def fetch_kwargs(cfg) -> dict:
    """What a CPU stage needs to fetch and decode media (storage and compute options)."""
    return {
        "storage_options": cfg.storage_options,
        "max_bytes": cfg.max_bytes,
        "fetch_threads": cfg.fetch_threads,
        "max_image_pixels": cfg.max_image_pixels,
        "allow_http": cfg.allow_http,
        "http_timeout_s": cfg.http_timeout,
        "transport_dtype": cfg.transport_dtype,
    }


def from_args(cls: type[C], args) -> C:
    """The configuration of `cls` from parsed arguments; an argument it has no field for is a bug."""
    names = {f.name for f in fields(cls)}
    given = vars(args)
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field for option(s) {', '.join(unknown)}")
    return cls(**given)


def derive(cls: type[C], base, **explicit) -> C:
    """A configuration of `cls` for a job run on behalf of another: `explicit` values, then every
    option `base` shares with `cls` (compute, storage, model kwargs...), then `cls`'s defaults."""
    names = {f.name for f in fields(cls)}
    shared = {f.name: getattr(base, f.name) for f in fields(base) if f.name in names}
    return cls(**{**shared, **explicit})


def defaults(cls) -> dict:
    """Each field's default (required fields omitted)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out

"""Loading sentence-transformers models, with or without their weights.

The preprocess pool needs the model's processor and ST's input handling but none of its
weights; the encode pool needs the weights. Both go through the real ST loading path
(hub names, revisions, HF_HUB_OFFLINE, trust_remote_code), so results equal ST's.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

_PATCH_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
    model_kwargs: dict = field(default_factory=dict)
    processor_kwargs: dict = field(default_factory=dict)
    kind: str = "embedder"  # "embedder" | "reranker" | "multivector"

    def to_dict(self) -> dict:
        return asdict(self)

    def __hash__(self):  # dict fields: hash the JSON form
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))


def _st_kwargs(spec: ModelSpec, device: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "device": device,
        "trust_remote_code": spec.trust_remote_code,
        "revision": spec.revision,
    }
    if spec.model_kwargs:
        kw["model_kwargs"] = dict(spec.model_kwargs)
    if spec.processor_kwargs:
        kw["processor_kwargs"] = dict(spec.processor_kwargs)
    return kw


@contextlib.contextmanager
def _weightless_from_pretrained():
    """Make transformers build models from their config on the meta device.

    transformers refuses `from_pretrained` under a meta device context, yet ST constructs the
    model inside its own loader; swapping `from_pretrained` for a config-only build keeps ST's
    processor, prompts and modality handling intact while no weight is read or allocated.
    """
    import torch
    from transformers import AutoConfig, PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_config_on_meta(cls, name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = AutoConfig.from_pretrained(
                name_or_path,
                trust_remote_code=kwargs.get("trust_remote_code", False),
                revision=kwargs.get("revision"),
            )
        with torch.device("meta"):
            return cls._from_config(config)

    with _PATCH_LOCK:
        PreTrainedModel.from_pretrained = classmethod(from_config_on_meta)
        try:
            yield
        finally:
            PreTrainedModel.from_pretrained = original


class ModelPathError(FileNotFoundError):
    """A model given as a local path that is not there."""


def check_model_path(name: str) -> None:
    """Raise ModelPathError for a name that can only be a local path and does not exist.

    A hub id is `name` or `owner/name`; anything written as a path (absolute, ./ ../ ~, a trailing
    slash, more than one /) is looked up on disk only, so a typo says so rather than failing as a
    malformed hub id.
    """
    as_path = name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", os.sep)) or name.count("/") > 1
    if as_path and not os.path.exists(os.path.expanduser(name)):
        raise ModelPathError(f"model path {name} does not exist (looked for {os.path.abspath(os.path.expanduser(name))})")


MULTI_VECTOR = "MultiVectorEncoder"


def model_family(spec: ModelSpec) -> str:
    """The sentence-transformers class a checkpoint is saved for, read as ST 6 reads it before loading.

    `config_sentence_transformers.json`'s model_type ("ColBERT" is PyLate's name for a multi-vector
    model); else config.json's architectures: Stanford ColBERT (`HF_ColBERT`) and transformers-native
    late-interaction retrievers (`*ForRetrieval`: ColPali, ColQwen2) are multi-vector. Needed because
    loading such a checkpoint with `SentenceTransformer` either fails on its configuration class or,
    for a ColBERT-style one, silently drops its projection and mask and mean-pools one vector.
    """
    from sentence_transformers.util import load_file_path

    def read(filename: str) -> dict:
        try:
            path = load_file_path(spec.name_or_path, filename, revision=spec.revision,
                                  local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
        except Exception:  # noqa: BLE001 - an unreachable hub: the load itself will say why
            return {}
        if path is None:
            return {}
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)

    model_type = read("config_sentence_transformers.json").get("model_type")
    if model_type == "ColBERT":
        return MULTI_VECTOR
    if model_type:
        return model_type
    architectures = read("config.json").get("architectures") or []
    if "HF_ColBERT" in architectures or any(a.endswith("ForRetrieval") for a in architectures):
        return MULTI_VECTOR
    return "SentenceTransformer"


def load_model(spec: ModelSpec, *, weights: bool = True, device: str | None = None):
    """Load the ST model class for the spec. Without weights, parameters live on `meta`."""
    check_model_path(spec.name_or_path)
    with _collector_paused():
        if spec.kind == "reranker":
            from sentence_transformers import CrossEncoder as cls
        elif spec.kind == "multivector":
            from sentence_transformers import MultiVectorEncoder as cls
        else:
            from sentence_transformers import SentenceTransformer as cls
        if not weights:
            with _weightless_from_pretrained():
                return cls(spec.name_or_path, **_st_kwargs(spec, "meta"))
        return cls(spec.name_or_path, **_st_kwargs(spec, device))


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection while ST, transformers and torch import and build a model.

    Those imports create millions of long-lived objects, and the collector's passes over them as
    they grow are a measurable share of a cold import (benchmarks/RESULTS.md, "A cold job's fixed cost"), paid by the
    driver and by every actor. Nothing they
    build is garbage worth collecting meanwhile; the collector resumes as it was afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def model_revision(spec: ModelSpec) -> str:
    """The revision recorded in the run manifest and used in conflict checks.

    A hub model resolves to the commit of its cached snapshot; a local directory to a digest
    of its files' names, sizes and modification times, so a rebuilt local model counts as new.
    """
    path = spec.name_or_path
    if os.path.isdir(path):
        h = hashlib.sha256()
        for dirpath, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{os.path.relpath(os.path.join(dirpath, name), path)}\0{st.st_size}\0{int(st.st_mtime)}".encode())
        return spec.revision or f"local-{h.hexdigest()[:12]}"
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(path, revision=spec.revision, local_files_only=True, allow_patterns=["config.json"])
        return os.path.basename(os.path.normpath(snap))
    except Exception:  # noqa: BLE001 - recorded as asked when the cache cannot tell
        return spec.revision or "main"


def resolve_prompt(model, task: str | None, prompt_name: str | None, prompt: str | None) -> str | None:
    """The prompt `encode_query`/`encode_document`/`encode` would use for these options."""
    if task in ("query", "document") and prompt_name is None and prompt is None:
        # MultiVectorEncoder.encode_document also takes a "passage" or "corpus" prompt.
        names = ("document", "passage", "corpus") if task == "document" and is_multi_vector(model) else (task,)
        prompt_name = next((name for name in names if name in model.prompts), None)
    return model._resolve_prompt(prompt, prompt_name)


def is_multi_vector(model) -> bool:
    return type(model).__name__ == MULTI_VECTOR


def modality_label(modality) -> str:
    if isinstance(modality, (tuple, list)):
        return "+".join(sorted(modality))
    return str(modality)


def label_modality(label: str):
    """A record's modality label (`text`, `image+text`) as ST's Modality (a string or a tuple)."""
    parts = tuple(sorted(label.split("+")))
    return parts[0] if len(parts) == 1 else parts


def unsupported_modalities(model, labels: set[str]) -> list[str]:
    """The modality labels among `labels` that the model cannot take."""
    return sorted(label for label in labels if not model.supports(label_modality(label)))

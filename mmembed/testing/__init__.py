"""Test helpers for mmembed: tiny offline stand-ins for the hub models it embeds and reranks with."""

from mmembed.testing.tiny_models import (
    QWEN3VL_EMBEDDING_PROMPTS,
    TINY_MODEL_KINDS,
    build_tiny_clap,
    build_tiny_clip,
    build_tiny_cross_encoder,
    build_tiny_qwen3vl_embedder,
    build_tiny_qwen3vl_reranker,
    tiny_model,
)

__all__ = [
    "QWEN3VL_EMBEDDING_PROMPTS",
    "TINY_MODEL_KINDS",
    "build_tiny_clap",
    "build_tiny_clip",
    "build_tiny_cross_encoder",
    "build_tiny_qwen3vl_embedder",
    "build_tiny_qwen3vl_reranker",
    "tiny_model",
]

"""mmembed's tiny test models (tiny_models.py) grown to the real shapes of CLIP B/32, CLIP L/14 and
Qwen3-VL-2B with random weights, or kept tiny for smoke runs: what the benchmarks time (compute does
not depend on the weights). Torch and transformers are imported inside `build_model`: a bare GPU
node imports this module cheaply."""

from __future__ import annotations

import json
import os
import shutil

# ---------------------------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------------------------
CLIP_SHAPES = {
    # (vision tower, text tower, projection) as in openai/clip-vit-base-patch32 / -large-patch14
    "b32": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32),
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        512,
    ),
    "l14": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14),
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        768,
    ),
}


TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# Qwen3-VL-2B (the backbone of Qwen3-VL-Embedding-2B).
QWEN_TEXT = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=32768,
    initializer_range=0.02,
)


QWEN_MROPE = [24, 20, 20]  # covers head_dim / 2 = 64 rotary pairs


QWEN_VISION = dict(
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    out_hidden_size=2048,
    deepstack_visual_indexes=[5, 11, 17],
    num_position_embeddings=2304,
    initializer_range=0.02,
)


# vidore/colqwen2-v1.0: at most 768 merged 28-pixel cells per image.
COLQWEN_MAX_PIXELS = 768 * 28 * 28
COLQWEN_MIN_PIXELS = 4 * 28 * 28
QWEN_MAX_PIXELS = 360_000


QWEN_MIN_PIXELS = 64 * 32 * 32


# ---------------------------------------------------------------------------------------------
# Models: mmembed's tiny test models grown to the real shapes
# ---------------------------------------------------------------------------------------------
def _processor_config(path: str) -> tuple[str, dict, dict]:
    """The saved image-processor settings, wherever this transformers version keeps them."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file) as f:
                whole = json.load(f)
            return file, whole, whole.get("image_processor", whole)
    raise FileNotFoundError(f"no image processor config in {path}")


def _replace_weights(path: str, model) -> None:
    for name in os.listdir(path):
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".json")):
            os.remove(os.path.join(path, name))
    model.save_pretrained(path)


def build_model(root: str, name: str, smoke: bool, dtype: str, device: str) -> str:
    """An ST model directory for `name` (clip_b32 | clip_l14 | qwen3vl | colqwen2), built once. colqwen2 keeps
    the tiny model's weights (host benchmarks only run its processor) with vidore/colqwen2's pixel budget."""
    import torch

    from mmembed.testing import tiny_model

    path = os.path.join(root, "models", f"{name}-{'smoke' if smoke else 'full'}-{dtype}")
    if os.path.exists(os.path.join(path, ".full")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    kind = "clip" if name.startswith("clip") else ("colqwen2" if name == "colqwen2" else "qwen3vl_embedder")
    tiny = tiny_model(kind, os.path.join(root, "tiny"))
    shutil.copytree(tiny, path)
    if name == "colqwen2":
        file, whole, ip = _processor_config(path)
        ip["size"] = {"shortest_edge": COLQWEN_MIN_PIXELS, "longest_edge": COLQWEN_MAX_PIXELS}
        with open(file, "w") as f:
            json.dump(whole, f, indent=2)
        open(os.path.join(path, ".full"), "w").close()
        return path
    torch_dtype = getattr(torch, dtype)
    # Random init runs on the GPU when there is one: a 2B model initialises in seconds there.
    init_device = "cuda" if device == "cuda" else "cpu"
    if name.startswith("clip"):
        from transformers import CLIPConfig, CLIPModel

        vision, text, proj = CLIP_SHAPES[name.split("_")[1]]
        if smoke:
            vision, text, proj = {**TINY_TOWER, "patch_size": 32}, TINY_TOWER, 16
        cfg = CLIPConfig.from_pretrained(path)
        cfg.text_config.update({**text, "projection_dim": proj, "initializer_factor": 1.0})
        cfg.vision_config.update({**vision, "image_size": 224, "projection_dim": proj, "initializer_factor": 1.0})
        cfg.projection_dim, cfg.initializer_factor = proj, 1.0
        with torch.device(init_device):
            model = CLIPModel(cfg).to(torch_dtype)
        _replace_weights(path, model)
        file, whole, ip = _processor_config(path)
        ip["size"] = {"shortest_edge": 224}
        ip["crop_size"] = {"height": 224, "width": 224}
    else:
        from transformers import Qwen3VLConfig, Qwen3VLModel

        cfg = Qwen3VLConfig.from_pretrained(path)
        if not smoke:
            cfg.text_config.update(QWEN_TEXT)
            cfg.text_config.rope_parameters = {**cfg.text_config.rope_parameters, "mrope_section": QWEN_MROPE}
            cfg.vision_config.update(QWEN_VISION)
        else:
            cfg.text_config.update(dict(initializer_range=0.02))
            cfg.vision_config.update(dict(initializer_range=0.02, num_position_embeddings=2304))
        with torch.device(init_device):
            model = Qwen3VLModel(cfg).to(torch_dtype)
        _replace_weights(path, model)
        file, whole, ip = _processor_config(path)
        ip["size"] = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
        # The pooling module declares the embedding width (get_embedding_dimension): grow it with
        # the backbone, or the encode stage sizes its output for the tiny model's width.
        pooling = os.path.join(path, "1_Pooling", "config.json")
        with open(pooling) as f:
            pool_cfg = json.load(f)
        for key in ("embedding_dimension", "word_embedding_dimension"):
            if key in pool_cfg:
                pool_cfg[key] = cfg.text_config.hidden_size
        with open(pooling, "w") as f:
            json.dump(pool_cfg, f, indent=2)
    with open(file, "w") as f:
        json.dump(whole, f, indent=2)
    del model
    open(os.path.join(path, ".full"), "w").close()
    return path

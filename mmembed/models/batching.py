"""How the encoder splits the rows it receives into forward passes.

A forward pass costs what its padded tensors cost: rows x the longest sequence in the batch
for token tensors, plus the vision patches, which VLM processors pack without padding. With
a fixed row count, a batch of large screenshots can run out of GPU memory while a batch of
small ones leaves the GPU underfed; a token budget keeps every pass about the same size.
Rows are sorted by length within the window the encoder holds (the rows of one call), so
rows of similar length share a batch and little compute goes to padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Feature keys whose first axis counts vision patches (Qwen-VL style processors flatten every
# image into rows of patches and concatenate them across the batch).
PATCH_KEYS = ("pixel_values", "pixel_values_videos")


def row_cost(row: dict) -> tuple[int, int]:
    """(sequence length, vision patches) of one preprocessed row, read from its shapes only."""
    keys, shapes = row["feat_keys"], row["feat_shapes"]
    tokens = 0
    for key in ("attention_mask", "input_ids"):
        if key in keys:
            tokens = int(shapes[keys.index(key)][-1])
            break
    patches = 0
    grid_keys = {"image_grid_thw": "pixel_values", "video_grid_thw": "pixel_values_videos"}
    for grid, pixel_key in grid_keys.items():
        # Only packed-patch layouts (a grid beside the pixels) count; CLIP-style [1, 3, H, W]
        # pixels have a fixed cost per row that the row cap already bounds.
        if grid in keys and pixel_key in keys:
            patches += int(shapes[keys.index(pixel_key)][0])
    return tokens, patches


@dataclass(frozen=True)
class Budget:
    """Most rows, padded tokens (rows x longest) and vision patches in one forward pass."""

    max_rows: int
    max_tokens: int | None = None
    max_patches: int | None = None

    def fits(self, rows: int, longest: int, patches: int) -> bool:
        if rows > self.max_rows:
            return False
        if self.max_tokens is not None and rows * longest > self.max_tokens:
            return False
        if self.max_patches is not None and patches > self.max_patches:
            return False
        return True


def plan_batches(costs: Sequence[tuple[int, int]], budget: Budget) -> list[list[int]]:
    """Split row indices into forward passes.

    Rows are taken longest first, so each batch's longest row is its first and padding stays
    small; a batch grows while it fits the budget. A row that alone exceeds the budget still
    gets a batch of its own (it may fail there, and only it becomes an error row). Without
    token or patch limits this is ST's own scheme: length-sorted chunks of `max_rows`.
    """
    order = sorted(range(len(costs)), key=lambda i: costs[i][0], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = patches = 0
    for i in order:
        tokens, row_patches = costs[i]
        if current and budget.fits(len(current) + 1, max(longest, tokens), patches + row_patches):
            current.append(i)
            longest = max(longest, tokens)
            patches += row_patches
            continue
        if current:
            batches.append(current)
        current, longest, patches = [i], tokens, row_patches
    if current:
        batches.append(current)
    return batches


def padding_waste(costs: Sequence[tuple[int, int]], batches: Sequence[Sequence[int]]) -> float:
    """Share of the token positions computed that are padding (0.0 when nothing is padded)."""
    real = padded = 0
    for batch in batches:
        lengths = [costs[i][0] for i in batch]
        real += sum(lengths)
        padded += len(lengths) * max(lengths, default=0)
    return 1.0 - real / padded if padded else 0.0

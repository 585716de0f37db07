"""Models: loading a sentence-transformers model (loading.py) and the encoder's side of the work:
token-budget batches (batching.py), the feature tensors the CPU pool ships (features.py), pinned
host staging (staging.py), device bookkeeping (device_use.py). Imports nothing of mmembed."""

"""Stores: versioned embedding stores (store.py), what changed since a snapshot (changes.py) and ANN
indexes over embeddings (index.py). Imports outputs, storage and schema."""

"""Ray Data stages. One class per file; pipelines/ composes them."""

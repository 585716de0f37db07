"""Jobs: each command's plan and stage list (embed.py, rerank.py, ...), their typed configs (config.py)
and the runner they share (runner.py). They import every room below them: stages, executors, stores,
outputs, inputs, models, media, storage."""

"""Stages: one class (or function) per file, which loads its heavy state once and does one thing per
batch; declared in each job's stage list (mmembed/jobs/) and applied by mmembed/executors/pipeline.py.
They import stores, outputs, inputs, models, media and storage, never executors or jobs."""

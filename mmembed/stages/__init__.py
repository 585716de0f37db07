"""Stages: one class (or function) per file, declared in each job's stage list (mmembed/jobs/) and applied by mmembed/pipeline.py."""

"""The jobs: each one's plan and stage list, and the runner they share (runner.py)."""

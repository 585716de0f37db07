"""Executors: the one place a job's stage list runs, on Ray Data or in this process (pipeline.py,
local.py), and Ray start-up, executor choice and pool sizing (cluster.py). Imports models only."""

"""`python -m mmembed.cli <command> ...`: the `mmembed` console script as a module (what `mmembed submit` runs)."""

from mmembed.cli import entry

entry()

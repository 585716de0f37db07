"""Faults injected into a real job, for the tests that hold the crash-safety promises."""

from __future__ import annotations

import os

from mmembed.stages.write_ray import RayShardWriter


class DyingShardWriter(RayShardWriter):
    """The Ray shard writer, except that the first write task to commit a shard then kills its own
    worker process, as a node or OOM kill would, leaving its committed shard behind for Ray's retry
    of the task to meet. `die_marker`: a local file that says the death already happened (created
    just before dying, so exactly one task dies however many workers share the machine)."""

    def __init__(self, *args, die_marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.die_marker = die_marker

    def _write_atomic(self, fs, directory, name, table):
        super()._write_atomic(fs, directory, name, table)
        try:
            fd = os.open(self.die_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, name.encode())
        os.close(fd)
        os._exit(1)

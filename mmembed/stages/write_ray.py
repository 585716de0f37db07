"""Stage 4 on Ray: ShardWriter as a Ray Data Datasink, what `Dataset.write_datasink` takes.

ShardWriter's own methods (write, on_write_start, on_write_complete, min_rows_per_write) are the
Datasink's: Ray runs `write` in its write tasks and the others on the driver.
"""

from __future__ import annotations

from ray.data.datasource.datasink import Datasink

from mmembed.stages.write import ShardWriter


class RayShardWriter(ShardWriter, Datasink):
    """The shard writer the Ray pipelines hand to `write_datasink`."""

"""WebDataset tar shards made on the spot, for tests and benchmarks."""

from __future__ import annotations

import io
import tarfile


def tar_shard(records: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of `key.ext` members in record order, as webdataset's ShardWriter and img2dataset write them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in records:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()

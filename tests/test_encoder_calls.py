"""--calls-per-encoder: several calls at once on an encoder actor's threads change no output."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer

from tests.helpers import decoded, image_bytes, max_abs_diff, read_output


@pytest.mark.parametrize("calls", [1, 2])
def test_calls_per_encoder_overlap_equal_st_and_keep_every_id(ray_session, tiny_clip, tmp_path, calls):
    """A device slowed to 0.4 s a batch makes blocks queue at the encoder; the stage's own count of the
    calls it ran at once then shows whether Ray overlapped them, and the outputs must not change."""
    from mmembed.testing.standin import SlowDeviceEncoder
    from mmembed import cli
    from mmembed.jobs.embed import EmbedJob
    from mmembed.jobs.runner import run
    from mmembed.stages.encode import EncodeStage

    imgs = [image_bytes(i, size=(40 + 4 * i, 32)) for i in range(24)]
    ids = [f"i{i:02d}" for i in range(24)] + ["broken"]
    table = pa.table({"id": ids, "image": pa.array([*imgs, b"not an image"], pa.binary())})
    src = tmp_path / "m.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out"
    # Windows of 4 rows: the 25 records reach the encoder as several blocks, queued behind the slow device.
    argv = ["--input", str(src), "--output", str(out), "--model", tiny_clip, "--batch-size", "4",
            "--encode-window", "4", "--calls-per-encoder", str(calls), "--executor", "ray"]
    job = EmbedJob(cli.parse("embed", argv), replacements={EncodeStage: (SlowDeviceEncoder, {"delay": 0.4})})
    assert run(job) == 0
    emb, errors, manifest = read_output(out)
    assert manifest["resources"]["calls_per_encoder"] == calls
    assert manifest["device_use"]["max_concurrent_calls"] == calls
    assert set(emb) == set(ids[:24]) and set(errors) == {"broken"}
    ref = SentenceTransformer(tiny_clip, device="cpu").encode([decoded(b) for b in imgs], batch_size=4)
    assert max_abs_diff(emb, ids[:24], ref) <= 1e-5


def test_concurrent_calls_take_streams_of_their_own_and_equal_one_at_a_time(tiny_clip):
    """Each call an encoder runs at once holds a stream of its own (CUDA's default stream would queue their work in
    one line); streams are reused, not made per call; outputs equal the same batches run one at a time."""
    import threading

    from mmembed.models.loading import ModelSpec
    from mmembed.models.staging import CallStreams
    from mmembed.stages.encode import EncodeStage
    from mmembed.stages.preprocess import PreprocessStage

    spec = ModelSpec(tiny_clip)
    blocks = []
    for b in range(2):
        imgs = [image_bytes(100 * b + i, size=(48 + 8 * i, 40)) for i in range(12)]
        blocks.append(PreprocessStage(spec, fetch_threads=1)(pa.table({"id": [f"b{b}i{i}" for i in range(12)],
                                                                         "image_bytes": pa.array(imgs)})))
    stage = EncodeStage(spec, device="cpu", batch_size=2)
    sequential = [stage(block) for block in blocks]
    held, seen, entered = [], [], threading.Barrier(2)

    def enter(stream):
        import contextlib

        @contextlib.contextmanager
        def inside():
            held.append(stream)
            entered.wait(timeout=10)  # both calls inside at once: each must hold its own stream
            seen.append(tuple(held))
            yield
            held.remove(stream)
        return inside()

    stage.streams = CallStreams(object, enter)
    out: dict = {}
    threads = [threading.Thread(target=lambda b=b: out.__setitem__(b, stage(blocks[b]))) for b in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stage.streams.created == 2 and all(len(set(s)) == 2 for s in seen)
    entered = threading.Barrier(1)
    stage(blocks[0])  # a later call reuses a stream
    assert stage.streams.created == 2
    for b in range(2):
        assert out[b].column("id").equals(sequential[b].column("id"))
        assert out[b].column("embedding").equals(sequential[b].column("embedding"))

"""How the embed job sizes its pools and blocks from the cluster and the input (no Ray needed)."""

from __future__ import annotations

import pytest

from mmembed import cli
from mmembed.executors import cluster
from mmembed.inputs.discover import InputSpec


def _args(*extra: str):
    return cli.parse("embed", ["--input", "in", "--output", "out", "--model", "m", *extra])


def _spec(records: int, modalities=("image",)) -> InputSpec:
    return InputSpec(uri="in", kind="media", num_records=records, modalities=set(modalities))


def test_two_cpus_get_two_preprocessors_for_a_corpus():
    res = cluster.plan_resources(2, 0, _args())
    assert res["device"] == "cpu" and res["num_encoders"] == 1
    assert res["num_preprocessors"] == 2
    # Everything fits with room for the listing task (1 CPU) beside the pools.
    assert res["num_preprocessors"] * res["cpus_per_preprocessor"] + res["cpus_per_encoder"] <= 1.0


@pytest.mark.parametrize(
    ("records", "modalities", "cpus", "want"),
    [
        (16, ("image",), 2, 1),  # a small job does not wait on an actor it cannot use
        (2_000, ("image",), 2, 1),
        (2_001, ("image",), 2, 2),
        (1_000_000, ("image",), 2, 2),
        (30_000, ("text",), 2, 2),
        (10_000, ("text",), 2, 1),
        (10_000, ("image",), 64, 5),
        (10_000_000, ("image",), 64, 62),
    ],
)
def test_default_preprocess_pool_is_no_bigger_than_the_input_needs(records, modalities, cpus, want):
    assert cluster.plan_resources(cpus, 0, _args(), _spec(records, modalities))["num_preprocessors"] == want


@pytest.mark.parametrize(
    ("records", "want"),
    [
        (1_536, 13),  # the H200 run's screenshots: 16 CPUs - 1 - 2 encoders
        (16, 1),  # one preprocess batch, one actor
        (40, 3),
    ],
)
def test_on_a_gpu_node_the_pool_is_bounded_by_cpus_and_batches_not_records(records, want):
    res = cluster.plan_resources(16, 1, _args("--gpus-per-encoder", "0.5"), _spec(records))
    assert res["device"] == "cuda" and res["num_encoders"] == 2
    assert res["num_preprocessors"] == want


@pytest.mark.parametrize("cpus, want", [(2, 2), (16, 13)])
def test_pdfs_are_not_sized_as_one_record_each(cpus, want):
    """398 PDFs of 8 pages are 3,184 pages: a pool capped at one actor per 2,000 documents halved the rate."""
    for spec in (InputSpec(uri="in", kind="media", num_records=398, modalities={"pdf"}, documents=398),
                 InputSpec(uri="in", kind="manifest", num_records=398, modalities={"image"}, columns=["id", "pdf"])):
        gpus = 1 if cpus == 16 else 0
        extra = ("--gpus-per-encoder", "0.5") if gpus else ()
        assert cluster.plan_resources(cpus, gpus, _args(*extra), spec)["num_preprocessors"] == want


def test_an_explicit_pool_size_is_kept_whatever_the_input():
    assert cluster.plan_resources(8, 0, _args("--num-preprocessors", "4"), _spec(10))["num_preprocessors"] == 4


@pytest.mark.parametrize(
    ("records", "modalities", "preprocessors", "want"),
    [
        (2_000, ("image",), 2, 250),  # about four blocks per actor
        (1_000_000, ("image",), 2, 256),  # media blocks stay small
        (1_000_000, ("text",), 2, 2_000),
        (10, ("text",), 4, 16),  # never below one preprocess batch
    ],
)
def test_blocks_give_every_preprocess_actor_several(records, modalities, preprocessors, want):
    assert cluster.block_rows(_spec(records, modalities), preprocessors, 16) == want


def test_calls_per_encoder_default_two_on_cuda_one_on_cpu():
    assert cluster.plan_resources(2, 0, _args())["calls_per_encoder"] == 1
    assert cluster.plan_resources(8, 1, _args())["calls_per_encoder"] == 2
    assert cluster.plan_resources(8, 1, _args("--calls-per-encoder", "3"))["calls_per_encoder"] == 3


def test_preprocess_actors_reserve_memory_and_the_pool_fits_the_clusters_memory():
    """A preprocess actor holds about a gigabyte; Ray is told so, and a default pool fits the memory."""
    from mmembed.executors.cluster import PREPROCESS_MEMORY, cpu_pool

    cfg = _args()
    res = cluster.plan_resources(64, 4, cfg, memory=8 * PREPROCESS_MEMORY)
    assert res["num_preprocessors"] == 6 and cpu_pool(cfg, res)["memory"] == PREPROCESS_MEMORY
    assert cluster.plan_resources(64, 4, cfg)["num_preprocessors"] > 6  # memory unknown: CPUs alone
    mine = _args("--memory-per-preprocessor", str(2 * PREPROCESS_MEMORY))
    res = cluster.plan_resources(64, 4, mine, memory=8 * PREPROCESS_MEMORY)
    assert res["num_preprocessors"] == 3 and cpu_pool(mine, res)["memory"] == 2 * PREPROCESS_MEMORY
    assert cluster.plan_resources(64, 4, _args("--num-preprocessors", "20"), memory=PREPROCESS_MEMORY)[
        "num_preprocessors"] == 20  # an explicit size is the user's
    # PDF actors hold pdfium's pages too: they reserve 1.5 GiB (Ray saw 1.1-1.2 GiB on 8-page PDFs).
    pdfs = InputSpec(uri="in", kind="media", num_records=398, modalities={"pdf"}, documents=398)
    res = cluster.plan_resources(64, 4, cfg, pdfs, memory=12 * PREPROCESS_MEMORY)
    assert res["memory_per_preprocessor"] == 3 << 29 and res["num_preprocessors"] == 6

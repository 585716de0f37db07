"""A job started just after a node is lost plans from the nodes that answer, and a job whose pools cannot
be placed exits saying so instead of waiting forever: on a real two-raylet cluster on loopback.

The head's health checks are slowed a little (RAY_health_check_*), so the killed worker stays listed alive
for about 40 s, as it does for 15-30 s after a real loss, while `ray.cluster_resources()` counts it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_cluster_submit import NODE_MEMORY, RAY, _env, _ours, free_port, node_ports, stop_cluster

pytestmark = pytest.mark.slow

DRIVER = """
import json, sys
import ray
from mmembed.jobs.config import EmbedConfig
from mmembed.jobs.runner import Executor
ray.init(address=sys.argv[1], logging_level="ERROR")
listed = ray.cluster_resources().get("CPU")
cfg = EmbedConfig(input="unused", output="unused", model="unused", device="cpu", address=sys.argv[1])
ex = Executor("ray", cfg)
dead = [n for n in ray.nodes() if not n["Alive"]]
print(json.dumps({"listed_cpus": listed, "planned_cpus": ex.cpus, "marked_dead_before_start": len(dead)}))
"""


def env() -> dict:
    # The head marks a lost node dead after about 40 s (8 failed checks 5 s apart), not 15-30 s: room for
    # the plan below to be made while the node is still listed, as a rerun right after a loss is.
    return {**_env(), "RAY_health_check_period_ms": "5000", "RAY_health_check_timeout_ms": "5000",
            "RAY_health_check_failure_threshold": "8"}


def start(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"


def alive_nodes(address: str) -> int:
    code = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); " \
           "print(sum(1 for n in ray.nodes() if n['Alive']))"
    r = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120, env=env())
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else 0


@pytest.fixture
def lost_node():
    root = tempfile.mkdtemp(prefix="mmnl", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-gpus=0", f"--object-store-memory={NODE_MEMORY}",
              "--disable-usage-stats"]
    try:
        start([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", "--num-cpus=2",
               '--resources={"cpu_node": 4}', f"--ray-client-server-port={free_port()}", f"--temp-dir={root}/h",
               *common, *node_ports()])
        start([RAY, "start", f"--address={address}", "--num-cpus=1", f"--temp-dir={root}/w", *common,
               *node_ports()])
        deadline = time.time() + 120
        while alive_nodes(address) < 2:
            assert time.time() < deadline, "the worker never joined"
            time.sleep(1)
        # The worker node dies at once, every process of it (its raylet first).
        for proc in sorted(_ours(f"{root}/w"), key=lambda p: "raylet" not in " ".join(p.cmdline())):
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        yield address
    finally:
        stop_cluster(root)
        shutil.rmtree(root, ignore_errors=True)


def test_a_job_after_a_node_loss_plans_from_live_nodes_and_unplaceable_pools_exit(lost_node, minilm_path, tmp_path):
    address = lost_node
    texts = {f"t{i}": f"sentence {i} about {['cats', 'ships', 'maps'][i % 3]}" for i in range(6)}
    pq.write_table(pa.table({"id": list(texts), "text": list(texts.values())}), tmp_path / "m.parquet")
    base = [sys.executable, "-m", "mmembed.cli", "embed", "--input", str(tmp_path / "m.parquet"), "--model",
            minilm_path, "--address", address, "--device", "cpu"]
    # Started right after the loss, while Ray still lists the dead node (and counts its CPU): the job leaves
    # it out of its plan, starts once Ray has marked it dead, and finishes.
    run = subprocess.run([*base, "--output", str(tmp_path / "ok")], capture_output=True, text=True, timeout=600,
                         env=env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "did not answer" in run.stderr and "Ray lists 3 CPUs, the answering nodes have 2" in run.stderr, \
        run.stderr[-3000:]
    manifest = json.loads((tmp_path / "ok" / "_manifest.json").read_text())
    assert manifest["counts"]["written"] == len(texts) and manifest["resources"]["executor"] == "ray"
    assert manifest["resources"]["cluster_cpus"] == 2.0

    # The job's own plan, as a driver sees it now that the node is marked dead: the same figures.
    r = subprocess.run([sys.executable, "-c", DRIVER, address], capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"listed_cpus": 2.0, "planned_cpus": 2.0,
                                                             "marked_dead_before_start": 1}

    # Pools that no live node can hold: exit 1 within the bound, saying so, nothing written but the lease.
    started = time.monotonic()
    run = subprocess.run([*base, "--output", str(tmp_path / "never"), "--preprocessor-resources",
                          '{"cpu_node": 5}', "--placement-timeout", "10"], capture_output=True, text=True,
                         timeout=300, env=env())
    assert run.returncode == 1, (run.returncode, run.stderr[-3000:])
    assert time.monotonic() - started < 120
    assert "could not be placed within 10 s" in run.stderr and "--placement-timeout" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "never" / "_manifest.json").exists()
    assert not list((tmp_path / "never").glob("part-*.parquet"))

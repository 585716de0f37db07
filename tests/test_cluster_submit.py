"""`mmembed submit` against a real two-node Ray cluster started on this machine.

The head (`ray start --head`, dashboard and job server on loopback) carries a `cpu_node`
resource and the worker (`ray start --address`) a `gpu_node` one, standing in for a GPU node.
An embed job and a reembed job go through the Job Submission API; the test checks their outputs
and that the encoder actors ran on the `gpu_node` node and the CPU-pool actors on the other.

The cluster is this module's own (not the session's `ray_session`), in its own temp dir, on
free ports, with 2 logical CPUs on the head (Ray Data's file listing task needs one whole CPU
besides the preprocess actor) and 1 on the worker; teardown ends exactly the processes it started, found by that
temp dir (plus their children). It does not call `ray stop`, which would stop every Ray
process on the machine, including other test sessions'.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

RAY = str(Path(sys.executable).parent / "ray")
NODE_MEMORY = 250_000_000  # object store per node: tiny inputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def submit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "submit", *args],
        capture_output=True, text=True, timeout=timeout, env=_env(),
    )  # fmt: skip


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # Token auth on every node and client alike (Ray's default for local clusters, made explicit
    # so `ray start --address` and the job client agree with the head); the token is ~/.ray/auth_token.
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="1", RAY_AUTH_MODE="token")
    # Jobs run `python -m mmembed.cli ...`: the nodes' `python` is this environment's, as in an activated venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def ray_list(kind: str, dashboard: str) -> list[dict]:
    """`ray list <kind>` through the state API, in a subprocess with the cluster's auth settings."""
    r = subprocess.run(
        [RAY, "list", kind, "--detail", "--format=json", "--limit=10000", f"--address={dashboard}"],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _ours(marker: str):
    """Processes this cluster started: those naming its temp dir, and all their descendants."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_cluster(marker: str) -> list[int]:
    import psutil

    procs = _ours(marker)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return [p.pid for p in _ours(marker)]


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="mmrc", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dash_port = free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dash_port}"
    head = [
        RAY, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--num-gpus=0",
        '--resources={"cpu_node": 4}', f"--object-store-memory={NODE_MEMORY}",
        f"--temp-dir={root}/h", "--disable-usage-stats", *node_ports(),
    ]  # fmt: skip
    worker = [
        RAY, "start", f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1",
        "--num-cpus=1", "--num-gpus=0", '--resources={"gpu_node": 1}', f"--object-store-memory={NODE_MEMORY}",
        f"--temp-dir={root}/w", "--disable-usage-stats", *node_ports(),
    ]  # fmt: skip
    try:
        for cmd in (head, worker):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
            assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
        nodes = _wait_for_nodes(dashboard, 2)
        by_resource = {
            key: [n["node_id"] for n in nodes if key in (n.get("resources_total") or {})]
            for key in ("cpu_node", "gpu_node")
        }
        assert len(by_resource["cpu_node"]) == 1 and len(by_resource["gpu_node"]) == 1, nodes
        yield {
            "dashboard": dashboard,
            "cpu_node": by_resource["cpu_node"][0],
            "gpu_node": by_resource["gpu_node"][0],
        }
    finally:
        left = stop_cluster(root)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"cluster processes survived teardown: {left}"


def _wait_for_nodes(dashboard: str, n: int, timeout: float = 180) -> list[dict]:
    deadline = time.time() + timeout
    nodes = []
    while time.time() < deadline:
        try:
            nodes = [x for x in ray_list("nodes", dashboard) if x["state"] == "ALIVE"]
        except (AssertionError, ValueError):  # the dashboard may still be starting
            nodes = []
        if len(nodes) >= n:
            return nodes
        time.sleep(2)
    raise AssertionError(f"{len(nodes)} of {n} nodes came up at {dashboard}")


def actor_nodes(dashboard: str, stage: str) -> set[str]:
    return {a["node_id"] for a in ray_list("actors", dashboard) if stage in (a.get("class_name") or "")}


RESOURCES = [
    "--device", "cpu", "--num-encoders", "1", "--num-preprocessors", "1",
    "--cpus-per-encoder", "0.5", "--cpus-per-preprocessor", "0.5",
    "--encoder-resources", '{"gpu_node": 1}', "--preprocessor-resources", '{"cpu_node": 1}',
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("cluster_in")
    texts = {f"c{i}": f"cluster test sentence {i} about {['cats', 'ships', 'maps'][i % 3]}" for i in range(6)}
    pq.write_table(pa.table({"id": list(texts), "text": list(texts.values())}), d / "m.parquet")
    return d / "m.parquet", texts


def _embeddings(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(d.glob("part-*.parquet")):
        t = pq.read_table(f)
        vecs = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1)
        out.update(zip(t.column("id").to_pylist(), vecs))
    return out


@pytest.mark.slow
def test_embed_and_reembed_jobs_on_a_two_node_cluster(cluster, corpus, minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    manifest, texts = corpus
    ids = sorted(texts)
    ref = SentenceTransformer(minilm_path, device="cpu").encode([texts[i] for i in ids], convert_to_numpy=True)

    out = tmp_path / "embed_out"
    r = submit(
        "--address", cluster["dashboard"], "--runtime-env", '{"env_vars": {"HF_HUB_OFFLINE": "1"}}', "--wait", "--",
        "embed", "--input", str(manifest), "--output", str(out), "--model", minilm_path, *RESOURCES,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert re.search(r"^submitted raysubmit_\w+ to http://127\.0\.0\.1:\d+", r.stdout, re.M)
    assert "mmembed embed: complete" in r.stdout, "the job's logs are followed"
    assert "SUCCEEDED" in r.stdout
    emb = _embeddings(out)
    assert sorted(emb) == ids
    assert float(np.max(np.abs(np.stack([emb[i] for i in ids]) - ref))) <= 1e-5
    assert json.loads((out / "_manifest.json").read_text())["counts"]["written"] == len(ids)

    assert actor_nodes(cluster["dashboard"], "EncodeStage") == {cluster["gpu_node"]}
    assert actor_nodes(cluster["dashboard"], "PreprocessStage") == {cluster["cpu_node"]}

    store = tmp_path / "store"
    r = submit(
        "--address", cluster["dashboard"], "--wait", "--",
        "reembed", "--input", str(manifest), "--store", str(store), "--model", minilm_path, *RESOURCES,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "6 new, 0 changed, 0 unchanged, 0 deleted; 6 embedded" in r.stdout
    current = store / json.loads((store / "CURRENT").read_text())["path"]
    emb = _embeddings(current)
    assert sorted(emb) == ids
    assert float(np.max(np.abs(np.stack([emb[i] for i in ids]) - ref))) <= 1e-5
    assert actor_nodes(cluster["dashboard"], "ContentHashStage") == {cluster["cpu_node"]}
    assert actor_nodes(cluster["dashboard"], "EncodeStage") == {cluster["gpu_node"]}


@pytest.mark.slow
def test_a_failing_job_fails_the_submit_with_its_exit_code(cluster, minilm_path, tmp_path):
    r = submit(
        "--address", cluster["dashboard"], "--wait", "--",
        "embed", "--input", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "o"), "--model", minilm_path,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "input not found" in r.stdout and "FAILED" in r.stdout
    assert not (tmp_path / "o").exists()


def test_unreachable_cluster_is_a_clear_usage_error(tmp_path):
    r = submit("--address", f"http://127.0.0.1:{free_port()}", "--", "versions", str(tmp_path), timeout=120)
    assert r.returncode == 2
    assert "cannot reach a Ray job server" in r.stderr and "nothing was submitted" in r.stderr


def test_commands_are_checked_before_anything_is_submitted(tmp_path):
    # No cluster at this address: these fail on the command itself, before any connection.
    addr = ["--address", f"http://127.0.0.1:{free_port()}"]
    for args, message in [
        ([], "no command given"),
        (["--", "embedd"], "unknown mmembed command"),
        (["--", "submit", "--", "embed"], "unknown mmembed command"),
        (["--", "embed", "--input", "x"], "do not parse"),
        (["--working-dir", str(tmp_path / "nope"), "--", "versions", "x"], "not a directory"),
    ]:
        r = submit(*addr, *args, timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)

"""cluster/: every manifest parses, names real mmembed commands, and asks for resources its
node groups have, sized the way the pipeline sizes its actor pools."""

from __future__ import annotations

import importlib
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import yaml

from mmembed.cli import COMMANDS
from mmembed.cli.submit import check_command, entrypoint, shown, split_command
from mmembed.executors import cluster

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
# Ray's default object store takes 30% of a node's memory; actors may reserve the rest.
ACTOR_MEMORY_SHARE = 0.7
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


@dataclass
class Group:
    name: str
    cpus: float
    gpus: float
    memory: float
    custom: dict = field(default_factory=dict)
    replicas: int = 1
    images: list = field(default_factory=list)


def quantity(text) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert m, f"not a Kubernetes quantity: {text!r}"
    return float(m.group(1)) * UNITS.get(m.group(2), 1)


def kuberay_groups(cluster_spec: dict) -> list[Group]:
    groups = []
    head = dict(cluster_spec["headGroupSpec"], groupName="head", replicas=1)
    for spec in [head, *cluster_spec["workerGroupSpecs"]]:
        params = spec.get("rayStartParams", {})
        (container,) = [c for c in spec["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
        limits = container["resources"]["limits"]
        custom = json.loads(json.loads(params["resources"])) if "resources" in params else {}
        groups.append(
            Group(
                name=spec["groupName"],
                cpus=float(params.get("num-cpus", quantity(limits["cpu"]))),
                gpus=float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
                memory=quantity(limits["memory"]) * ACTOR_MEMORY_SHARE,
                custom=custom,
                replicas=int(spec["replicas"]),
                images=[c["image"] for c in spec["template"]["spec"]["containers"]],
            )
        )
    return groups


def aws_groups(cfg: dict) -> list[Group]:
    groups = []
    for name, node in cfg["available_node_types"].items():
        res = dict(node["resources"])
        groups.append(
            Group(
                name=name,
                cpus=float(res.pop("CPU")),
                gpus=float(res.pop("GPU", 0)),
                memory=float(res.pop("memory", 0)),
                custom=res,
                replicas=1 if name == cfg["head_node_type"] else int(node["min_workers"]),
                images=[cfg["docker"]["image"]],
            )
        )
    return groups


def parse_entrypoint(command: str):
    """(subcommand, parsed options) of an mmembed entrypoint; fails on anything else."""
    tokens = shlex.split(command)
    if tokens[:3] == ["python", "-m", "mmembed.cli"]:
        tokens = ["mmembed", *tokens[3:]]
    if tokens[:2] == ["python", "-m"]:
        module, name, rest = tokens[2], tokens[2].rsplit(".", 1)[-1], tokens[3:]
        assert any(m == module for m, _ in COMMANDS.values()), f"{module} is not an mmembed job module"
    else:
        assert tokens[0] == "mmembed", f"entrypoint is not an mmembed command: {command}"
        name, rest = tokens[1], tokens[2:]
        assert name in COMMANDS, f"unknown mmembed command {name!r}"
        module = COMMANDS[name][0]
    parser = importlib.import_module(module).build_parser()
    return name, parser.parse_args(rest)


def check_fit(args, groups: list[Group]) -> dict:
    """The job's per-actor requests against the node groups; returns the planned pools."""
    assert args.device == "cuda", "a cluster job should pin encoders to GPUs"
    assert args.encoder_resources and args.preprocessor_resources, "both pools need a node label"
    enc = [g for g in groups if set(args.encoder_resources) <= set(g.custom)]
    pre = [g for g in groups if set(args.preprocessor_resources) <= set(g.custom)]
    assert enc, f"no node group carries {args.encoder_resources}"
    assert pre, f"no node group carries {args.preprocessor_resources}"
    assert not set(g.name for g in enc) & set(g.name for g in pre), "encoders and preprocessors share nodes"
    enc_slots = pre_slots = 0
    for g in enc:
        per_node = math.floor(g.gpus / args.gpus_per_encoder + 1e-9)
        assert per_node >= 1, f"{g.name}: {g.gpus} GPUs cannot hold an encoder of {args.gpus_per_encoder}"
        assert per_node * (args.cpus_per_encoder or 1.0) <= g.cpus, f"{g.name}: encoders need more CPUs"
        for k, v in args.encoder_resources.items():
            assert g.custom[k] >= per_node * v, f"{g.name}: {k} too small for {per_node} encoders"
        enc_slots += per_node * g.replicas
    for g in pre:
        assert g.gpus == 0, f"{g.name}: preprocess nodes should not hold GPUs"
        per_node = math.floor(g.cpus / args.cpus_per_preprocessor + 1e-9)
        if args.memory_per_preprocessor:
            per_node = min(per_node, math.floor(g.memory / args.memory_per_preprocessor))
        assert per_node >= 1, f"{g.name}: no room for one preprocess actor"
        for k, v in args.preprocessor_resources.items():
            assert g.custom[k] >= per_node * v
        pre_slots += per_node * g.replicas
    # Ray Data's file listing runs as a task that needs one whole CPU beside the actors.
    spare = [g.cpus - math.floor(g.gpus / args.gpus_per_encoder + 1e-9) * (args.cpus_per_encoder or 1.0) for g in enc]
    spare += [g.cpus % args.cpus_per_preprocessor for g in pre]
    assert max(spare) >= 1, "no node keeps a whole CPU free for Ray Data's listing and read tasks"
    # Sized as the pipeline sizes itself against the cluster it finds at start (initial replicas).
    res = cluster.plan_resources(sum(g.cpus * g.replicas for g in groups), sum(g.gpus * g.replicas for g in groups), args)
    assert res["device"] == "cuda"
    assert res["num_encoders"] <= enc_slots, f"{res['num_encoders']} encoders, room for {enc_slots}"
    assert res["num_preprocessors"] <= pre_slots, f"{res['num_preprocessors']} preprocess actors, room for {pre_slots}"
    return res


def load(name: str):
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def readme_commands() -> list[tuple[str, str]]:
    """(section heading, command) for every `mmembed ...` or `ray job submit ...` line in README code blocks."""
    out, section = [], ""
    text = (CLUSTER / "README.md").read_text()
    for block_or_line in re.split(r"(```bash\n.*?```)", text, flags=re.S):
        if not block_or_line.startswith("```bash"):
            for line in block_or_line.splitlines():
                if line.startswith("## "):
                    section = line[3:]
            continue
        body = re.sub(r"\\\n\s*", " ", block_or_line[len("```bash\n") : -3])
        for line in body.splitlines():
            line = line.strip().rstrip("&").strip()
            if line.startswith(("mmembed ", "ray job submit ")):
                out.append((section, line))
    return out


# ---------------------------------------------------------------------------------------------
def test_image_and_versions_are_spelled_out_and_agree():
    ver = ray.__version__
    expected = f"ghcr.io/your-org/mmembed:0.1.0-ray{ver}-py311-gpu"
    docker = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ver)}-py311-gpu$", docker, re.M)
    assert expected in docker
    specs = [load("raycluster.yaml")[0]["spec"], load("rayjob.yaml")[0]["spec"]["rayClusterSpec"]]
    docs = load("cronjob-reembed.yaml")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    specs.append(yaml.safe_load(cm["data"]["rayjob.yaml"])["spec"]["rayClusterSpec"])
    for spec in specs:
        assert spec["rayVersion"] == ver
        for g in kuberay_groups(spec):
            assert g.images == [expected], g.name
    assert load("aws.yaml")[0]["docker"]["image"] == expected
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    kubectl = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"bitnami/kubectl:\d+\.\d+\.\d+", kubectl), "pin the kubectl image"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "cronjob-reembed.yaml"])
def test_kuberay_manifests_have_a_cpu_group_and_a_gpu_group(name):
    docs = load(name)
    if name == "cronjob-reembed.yaml":
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
        docs = [yaml.safe_load(cm["data"]["rayjob.yaml"])]
    (doc,) = docs
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    groups = {g.name: g for g in kuberay_groups(spec)}
    assert groups["head"].cpus == 0, "the head runs drivers only"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0", "job server reachable"
    cpu = [g for g in groups.values() if g.name != "head" and g.gpus == 0]
    gpu = [g for g in groups.values() if g.gpus > 0]
    assert cpu and gpu
    assert all("cpu_node" in g.custom for g in cpu) and all("gpu_node" in g.custom for g in gpu)
    for w in spec["workerGroupSpecs"]:
        assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True, "a job's GPUs must not outlive it"
        name_, args = parse_entrypoint(doc["spec"]["entrypoint"])
        check_fit(args, list(groups.values()))


def test_rayjob_entrypoint_is_an_embed_that_fits_its_cluster():
    (doc,) = load("rayjob.yaml")
    name, args = parse_entrypoint(doc["spec"]["entrypoint"])
    assert name == "embed"
    res = check_fit(args, kuberay_groups(doc["spec"]["rayClusterSpec"]))
    assert res["num_encoders"] == 2 and res["num_preprocessors"] == 56


def test_cronjob_submits_a_nightly_incremental_reembed_rayjob():
    docs = {d["kind"]: d for d in load("cronjob-reembed.yaml")}
    cron = docs["CronJob"]
    minute, hour, dom, month, dow = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*", "*", "*"), "once a night"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[:3] == ["kubectl", "create", "-f"], "create, so each night's RayJob gets a generated name"
    mount = container["volumeMounts"][0]
    assert cmd[3].startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = docs["ConfigMap"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    rayjob = yaml.safe_load(cm["data"][cmd[3].rsplit("/", 1)[1]])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"]
    name, args = parse_entrypoint(rayjob["spec"]["entrypoint"])
    assert name == "reembed" and not args.full, "the nightly run must be incremental"
    # RayJobs outlive the CronJob's pod, so Forbid does not stop two nights overlapping: the later waits, boundedly.
    assert args.wait and 0 < args.wait_timeout < 24 * 3600, "queue behind an overrunning night, not for ever"
    assert args.store.startswith("s3://") and args.input.startswith("s3://")
    # A model upgrade in the entrypoint goes live only through the gate, on judgements the cluster can read.
    assert args.activate_if_better and not args.activate and args.metric == "ndcg@10"
    assert args.queries.startswith("s3://") and args.qrels.startswith("s3://")
    check_fit(args, kuberay_groups(rayjob["spec"]["rayClusterSpec"]))
    # The pod may create RayJobs, and nothing more.
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]


def test_aws_launcher_config_is_valid_and_has_gpu_workers():
    import jsonschema

    (cfg,) = load("aws.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    groups = {g.name: g for g in aws_groups(cfg)}
    assert groups[cfg["head_node_type"]].cpus == 0
    gpu = [g for g in groups.values() if g.gpus > 0]
    assert gpu and all("gpu_node" in g.custom for g in gpu)
    assert cfg["available_node_types"][gpu[0].name]["node_config"]["InstanceType"].startswith(("g", "p"))
    for cmd in cfg["head_start_ray_commands"]:
        if "ray start" in cmd:
            assert "--dashboard-host=0.0.0.0" in cmd and "--num-cpus=0" in cmd


def test_readme_commands_are_real_and_fit_the_clusters_they_run_on():
    commands = readme_commands()
    assert len(commands) >= 4
    aws = aws_groups(load("aws.yaml")[0])
    kuberay = kuberay_groups(load("raycluster.yaml")[0]["spec"])
    fitted = 0
    for section, line in commands:
        tokens = shlex.split(line)
        if tokens[0] == "ray":
            _, job = split_command(tokens)
            name, args = parse_entrypoint(shlex.join(job))
            assert name == "embed"
            continue
        if tokens[1] == "submit":
            _, job = split_command(tokens[2:])
        else:
            job = tokens[1:]
        assert check_command(job) is None, line
        if job[0] in ("embed", "reembed"):
            _, args = parse_entrypoint(shlex.join(["mmembed", *job]))
            check_fit(args, aws if section.startswith("AWS") else kuberay)
            fitted += 1
    assert fitted >= 2


def test_misfits_are_caught():
    """The checks above can fail: a request no node group can hold is reported."""
    (doc,) = load("rayjob.yaml")
    groups = kuberay_groups(doc["spec"]["rayClusterSpec"])
    entry = doc["spec"]["entrypoint"]
    for bad, why in [
        (entry.replace('"gpu_node": 1', '"tpu_node": 1'), "carries"),
        (entry.replace("--gpus-per-encoder 1", "--gpus-per-encoder 2"), "cannot hold"),
        (entry.replace("--memory-per-preprocessor 3000000000", "--memory-per-preprocessor 90000000000"), "no room"),
        (entry.replace("--num-preprocessors 56", "--num-preprocessors 200"), "do not fit|room for"),
    ]:
        _, args = parse_entrypoint(bad)
        with pytest.raises((AssertionError, cluster.UsageError), match=why):
            check_fit(args, groups)
    with pytest.raises(AssertionError, match="unknown mmembed command"):
        parse_entrypoint("mmembed embedd --input x")


def test_submit_refuses_credentials_on_the_command_line(capsys):
    """A submitted job's command line is visible to anyone who can list the cluster's jobs: credentials in
    --storage-options are refused before anything is contacted, and never printed."""
    from pipelines import submit

    secret = "wJalrXUtnFEMI-not-a-real-secret"
    opts = json.dumps({"key": "AKIAMMEMBEDEXAMPLE", "secret": secret, "endpoint_url": "http://127.0.0.1:9"})
    command = ["embed", "--input", "s3://b/in", "--output", "s3://b/out", "--model", "m", "--storage-options", opts]
    rc = submit.main(["--address", "http://127.0.0.1:9", "--", *command])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "--storage-options holds credentials" in err and "env_vars" in err and "Nothing was submitted" in err
    assert secret not in out + err and "AKIAMMEMBEDEXAMPLE" not in out + err
    # What submit prints of a command is its redacted form; without credentials the command passes.
    assert secret not in shown(command) and "***" in shown(command)
    clean = [*command[:-1], json.dumps({"endpoint_url": "http://127.0.0.1:9"})]
    assert check_command(clean) is None and shown(clean) == entrypoint(clean)

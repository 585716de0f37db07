"""The one runner every command that writes goes through (embed, rerank, search, reembed, index,
retrieve-rerank).

    job.plan()        every check that needs no cluster; a UsageError here exits 2, nothing written
    job.finished()    an output that already holds this run: report it, nothing to do
    lease             the output's (or store's) `_lock.json`, renewed while the job runs
    Executor          Ray (on --address, or in-process) or this process, with the planned pools
    job.execute()     the job's passes: its stage list applied by the executor into the shard writer
    manifest          the job's entries plus the run record every job keeps (shards, resources, timing)
    report, exit code 0 ok, 3 when every record failed or more than --max-error-fraction did

A job (mmembed/jobs/<job>.py) fills in the steps; it never starts Ray, writes its manifest or
chooses its exit code itself.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from mmembed import __version__
from mmembed.outputs.manifest import MANIFEST_NAME, command_line, library_versions, now_iso, report, write_json
from mmembed.outputs.runstate import empty_totals
from mmembed.storage.fs import join_uri

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERRORS = 0, 1, 2, 3


@dataclass
class Outcome:
    """What a job's execute() hands back to the runner."""

    manifest: dict  # the job's own entries: model, input, output, counts...
    totals: dict = field(default_factory=empty_totals)  # the writer's (or the accounting's) totals
    output: str | None = None  # where the report points (default: the job's output)
    # Failed share for --max-error-fraction; None: (errors + unaccounted) / records.
    failed_fraction: float | None = None


class Executor:
    """Where the stages run, and with which pools: "ray" or "local" (this process)."""

    def __init__(self, kind: str, cfg, spec=None, *, writer: tuple | None = None):
        from mmembed.executors import cluster

        self.kind = kind
        # (class, extra kwargs) of a stand-in shard writer, as a test puts one in (Job.replacements).
        self.writer = writer
        self.cpus = 1.0
        if kind == "local":
            self.where = "local"
            self.res = cluster.local_resources(cfg)
        else:
            self.where = cluster.init_ray(cfg.address)
            resources = cluster.live_resources()
            self.cpus = resources.get("CPU", 1)
            self.res = cluster.plan_resources(self.cpus, resources.get("GPU", 0), cfg, spec,
                                              memory=resources.get("memory"))
            cluster.check_placement(self.res, cfg, cfg.placement_timeout)

    @property
    def local(self) -> bool:
        return self.kind == "local"

    def sink(self, output: str, columns: list[str], cfg, run_token: str | None = None):
        """The shard writer: a Ray Datasink, or the same writer driven in-process."""
        if self.local:
            from mmembed.stages.write import ShardWriter
        else:
            from mmembed.stages.write_ray import RayShardWriter as ShardWriter
        cls, extra = self.writer or (ShardWriter, {})
        return cls(output, result_columns=columns, storage_options=cfg.storage_options,
                   shard_rows=cfg.shard_rows, run_token=run_token, **extra)

    def write(self, source, stages: list, sink) -> dict:
        """`source` through `stages` into `sink`; the writer's totals.

        `source` is a Ray dataset, or for the local executor an iterable of Arrow blocks.
        """
        return self.write_parts([(source, stages)], sink)

    def write_parts(self, parts: list[tuple], sink) -> dict:
        """Each (source, stages) part through its own stages, all into one `sink`: a union on Ray, one
        part after the other here."""
        import itertools

        from mmembed.executors.local import write
        from mmembed.executors.pipeline import apply_ray, stream_local

        if self.local:
            write(itertools.chain.from_iterable(stream_local(src, stages) for src, stages in parts), sink)
        else:
            datasets = [apply_ray(src, stages) for src, stages in parts]
            ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
            ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
        return {**empty_totals(), **(sink.result or {})}

    def call(self, fn, *args):
        """`fn(*args)` where the data is: in this process, or as a small Ray task (so that a driver on
        a laptop does not pull a store's shards across the network)."""
        if self.local:
            return fn(*args)
        import ray

        return ray.get(ray.remote(fn).options(num_cpus=0.25).remote(*args))

    def call_keeping(self, fn, *args):
        """`fn(*args)` -> (big, small): `small` comes back; `big` stays where it was made, as a handle
        the stages can read (on Ray, an IndexRef that each worker fetches once)."""
        if self.local:
            return fn(*args)
        import ray

        from mmembed.outputs.ids import IndexRef

        big, small = ray.remote(fn).options(num_cpus=0.25, num_returns=2).remote(*args)
        return IndexRef(big), ray.get(small)

    def resources(self, **extra) -> dict:
        planned_from = {} if self.local else {"cluster_cpus": self.cpus}  # the live nodes' CPUs
        return {**self.res, "executor": self.kind, **planned_from, **extra, "ray": self.where}


class Job:
    """A command that writes. Subclasses set `name` and fill in plan() and execute()."""

    name = ""
    results = "results"  # what a job with no error rows would have written, for the all-failed line

    def __init__(self, cfg, *, replacements: dict | None = None):
        self.cfg = cfg
        # {stage class: (replacement class, extra kwargs)}: a stand-in put into the stage list.
        self.replacements = replacements or {}

    @property
    def output(self) -> str:
        return self.cfg.output

    def plan(self) -> dict:
        raise NotImplementedError

    def finished(self, plan: dict) -> int | None:
        """An exit code when the output already holds this run, else None."""
        return None

    def lease(self, plan: dict):
        from mmembed.outputs.runstate import RunLock

        return RunLock(self.output, self.cfg.storage_options, ttl_s=self.cfg.lease_seconds)

    def acquire(self, lock) -> None:
        lock.acquire()

    def executor(self, plan: dict) -> str | None:
        """"ray", "local", or None for a job that needs neither (index builds in this process)."""
        return "ray"

    def execute(self, plan: dict, ex: Executor | None) -> Outcome | int:
        raise NotImplementedError

    def with_stand_ins(self, stages: list) -> list:
        from mmembed.executors.pipeline import replace
        from mmembed.stages.write import ShardWriter

        for old, (new, kwargs) in self.replacements.items():
            if old is not ShardWriter:  # the sink, not a stage: see writer_stand_in
                stages = replace(stages, old, new, **kwargs)
        return stages

    def writer_stand_in(self) -> tuple | None:
        """(class, kwargs) replacing the shard writer, when `replacements` names ShardWriter."""
        from mmembed.stages.write import ShardWriter

        return self.replacements.get(ShardWriter)

    def commit(self, plan: dict, manifest: dict) -> dict:
        """Write the manifest: from this moment the output is complete."""
        write_json(join_uri(self.output, MANIFEST_NAME), manifest, self.cfg.storage_options)
        return manifest

    def report(self, manifest: dict, output: str) -> str:
        return report(f"mmembed {self.name}", manifest, output)

    def failure_note(self, plan: dict) -> str:
        """Said after a failed run's counts (reembed: CURRENT was not moved)."""
        return ""

    def exit_code(self, plan: dict, manifest: dict, outcome: Outcome, output: str) -> int:
        return exit_code(self, plan, manifest, outcome, output)

    def conclude(self, plan: dict, manifest: dict, code: int) -> int:
        """After the report: a job's last words and actions (reembed moves CURRENT)."""
        return code


def run_record(totals: dict, resources: dict | None, started: float, started_iso: str) -> dict:
    """The manifest entries every job keeps about its run: shards, resources, versions, timing."""
    from mmembed.models.device_use import summarise

    return {
        "files": totals["files"],
        "error_files": totals["error_files"],
        **({"resources": resources} if resources is not None else {}),
        "device_use": summarise(totals.get("encoders", {})),
        "versions": library_versions(),
        "started_at": started_iso,
        "finished_at": now_iso(),
        "duration_s": round(time.time() - started, 3),
        "command_line": command_line(),
    }


def exit_code(job: Job, plan: dict, manifest: dict, outcome: Outcome, output: str) -> int:
    totals, counts = outcome.totals, manifest["counts"]
    where = f"{output.rstrip('/')}/_errors"
    note = job.failure_note(plan)
    if totals["errors"] and not totals["written"]:
        print(f"mmembed {job.name}: every record failed ({totals['errors']:,} error rows, no {job.results})"
              f"{note}; see {where}", file=sys.stderr)
        return EXIT_ERRORS
    failed = outcome.failed_fraction
    if failed is None:
        lost = max(counts.get("unaccounted") or 0, 0)
        failed = (totals["errors"] + lost) / max(counts["records"], 1)
    if failed > job.cfg.max_error_fraction:
        print(f"mmembed {job.name}: {failed:.1%} of records failed, above --max-error-fraction "
              f"{job.cfg.max_error_fraction:.1%}{note}; see {where}", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK


def run(job: Job) -> int:
    """Plan, lease, execute, account, commit, report: the exit code."""
    started, started_iso = time.time(), now_iso()
    plan = job.plan()
    code = job.finished(plan)
    if code is not None:
        return code
    lock = job.lease(plan)
    job.acquire(lock)
    try:
        kind = job.executor(plan)
        ex = Executor(kind, job.cfg, plan.get("input"), writer=job.writer_stand_in()) if kind else None
        outcome = job.execute(plan, ex)
        if isinstance(outcome, int):
            return outcome
        output = outcome.output or job.output
        entries = dict(outcome.manifest)
        resources = entries.pop("resources", None) or (ex.resources() if ex else None)
        manifest = {"status": "complete", "job": job.name, "mmembed_version": __version__, **entries}
        for key, value in run_record(outcome.totals, resources, started, started_iso).items():
            manifest.setdefault(key, value)  # a job may keep its own (index: its FAISS version)
        manifest = job.commit(plan, manifest)
        print(job.report(manifest, output), flush=True)
        return job.conclude(plan, manifest, job.exit_code(plan, manifest, outcome, output))
    finally:
        lock.release()

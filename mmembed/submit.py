"""`mmembed submit [options] -- <mmembed command ...>`: run an mmembed job on a Ray cluster.

The command goes to the cluster's job server through Ray's Job Submission API
(`ray.job_submission.JobSubmissionClient`), as `python -m mmembed.cli <command ...>`. Inside the
job, Ray sets RAY_ADDRESS, so the pipeline's `--address` default joins that cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time

from mmembed.options import EXIT_USAGE, json_object

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
EXIT_OK, EXIT_FAILED = 0, 1


def build_parser(prog: str = "mmembed submit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [--address URL] [--runtime-env JSON | --working-dir DIR] [--wait] -- COMMAND [ARGS ...]",
        description="Submit an mmembed command (embed, reembed, versions, ...) to a Ray cluster through the Ray "
        "Job Submission API. Prints the job id; with --wait, follows the job's logs and exits with its status.",
        epilog="Example: mmembed submit --address http://head:8265 --wait -- reembed --input s3://b/corpus "
        "--store s3://b/store --model sentence-transformers/clip-ViT-B-32. The same job without mmembed: "
        "ray job submit --address http://head:8265 -- python -m pipelines.embed --input ... --output ... "
        "--model .... Exit codes: 0 submitted (or, with --wait, succeeded), 2 bad usage or cluster unreachable "
        "(nothing submitted), the job's own exit code (or 1) when it failed or was stopped.",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD,
        help="The cluster's job server (Ray dashboard) URL (default: $RAY_API_SERVER_ADDRESS, then "
        f"$RAY_ADDRESS, then {DEFAULT_DASHBOARD}).",
    )
    env = p.add_mutually_exclusive_group()
    env.add_argument(
        "--runtime-env",
        type=json_object,
        default=None,
        help='Ray runtime environment as JSON, e.g. \'{"working_dir": ".", "env_vars": {"HF_HUB_OFFLINE": "1"}, '
        '"pip": ["mmembed"]}\'. Default: none (the cluster image has mmembed installed).',
    )
    env.add_argument(
        "--working-dir",
        default=None,
        help="Upload this local directory as the job's working directory (shorthand for "
        "--runtime-env '{\"working_dir\": DIR}'), e.g. a checkout of mmembed.",
    )
    p.add_argument("--wait", action="store_true", help="Follow the job's logs until it ends; exit with its status.")
    p.add_argument(
        "--submission-id",
        default=None,
        help="Job id to use (default: generated). Ray refuses a second job with the same id, which makes "
        "scheduled submissions idempotent.",
    )
    return p


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def check_command(command: list[str]) -> str | None:
    """None when `command` is a real mmembed command whose options parse; else the problem."""
    import importlib

    from mmembed.cli import COMMANDS

    if not command:
        return "no command given: put the mmembed command after `--`, e.g. `mmembed submit -- embed --input ...`"
    name = command[0]
    if name == "submit" or name not in COMMANDS:
        known = ", ".join(k for k in COMMANDS if k != "submit")
        return f"unknown mmembed command {name!r} (known: {known})"
    module = importlib.import_module(COMMANDS[name][0])
    parser = getattr(module, "build_parser", None)
    if parser is not None:
        try:
            parser().parse_args(command[1:])
        except SystemExit as exc:
            if exc.code:
                return f"the {name} options above do not parse; nothing was submitted"
    return None


def entrypoint(command: list[str]) -> str:
    return shlex.join(["python", "-m", "mmembed.cli", *command])


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait_for(client, job_id: str, *, poll_s: float = 1.0):
    from ray.job_submission import JobStatus

    try:
        asyncio.run(_follow(client, job_id))
    except Exception as exc:  # noqa: BLE001 - log streaming is best effort; the status below decides
        print(f"mmembed submit: log stream ended early ({type(exc).__name__}: {exc}); polling status", file=sys.stderr)
    while True:
        info = client.get_job_info(job_id)
        if info.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return info
        time.sleep(poll_s)


def exit_code(info) -> int:
    """The job's own exit code where Ray reports it, else 1 for any unsuccessful end."""
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return EXIT_OK
    code = getattr(info, "driver_exit_code", None)
    if code is None:
        m = re.search(r"exit code (\d+)", info.message or "")
        code = int(m.group(1)) if m else None
    return code if code else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, command = split_command(argv)
    args = build_parser().parse_args(own)
    problem = check_command(command)
    if problem:
        print(f"mmembed submit: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    runtime_env = args.runtime_env
    if args.working_dir:
        if not os.path.isdir(args.working_dir):
            print(f"mmembed submit: error: --working-dir {args.working_dir} is not a directory", file=sys.stderr)
            return EXIT_USAGE
        runtime_env = {"working_dir": args.working_dir}
    try:
        client = _client(args.address)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the job server is the same usage error
        print(
            f"mmembed submit: error: cannot reach a Ray job server at {args.address} ({type(exc).__name__}: {exc}). "
            "Check --address (the dashboard URL, e.g. http://<head>:8265) and that the cluster is up; "
            "nothing was submitted.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    job_id = client.submit_job(
        entrypoint=entrypoint(command),
        runtime_env=runtime_env,
        submission_id=args.submission_id,
        metadata={"submitted_by": "mmembed submit", "command": command[0]},
    )
    print(f"submitted {job_id} to {args.address}: {entrypoint(command)}", flush=True)
    if not args.wait:
        print(f"follow it with: ray job logs --follow --address {args.address} {job_id}", flush=True)
        return EXIT_OK
    info = wait_for(client, job_id)
    code = exit_code(info)
    print(f"job {job_id} {info.status.value}" + (f": {info.message}" if info.message else ""), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

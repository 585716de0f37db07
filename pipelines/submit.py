"""`mmembed submit [options] -- <mmembed command ...>`: run an mmembed job on a Ray cluster (the work:
mmembed/cli/submit.py). Inside the job, Ray sets RAY_ADDRESS, so the pipeline's `--address` default joins
that cluster."""

from __future__ import annotations

import argparse
import os
import sys

from mmembed.cli.options import json_object
from mmembed.cli.submit import EXIT_OK, check_command, entrypoint, exit_code, job_client, shown, split_command, wait_for
from mmembed.errors import EXIT_USAGE

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


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
        client = job_client(args.address)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the job server is the same usage error
        print(
            f"mmembed submit: error: cannot reach a Ray job server at {args.address} ({type(exc).__name__}: {exc}). "
            "Check --address (the dashboard URL, e.g. http://<head>:8265) and that the cluster is up; "
            "nothing was submitted.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    job_id = client.submit_job(entrypoint=entrypoint(command), runtime_env=runtime_env, submission_id=args.submission_id,
                               metadata={"submitted_by": "mmembed submit", "command": command[0]})
    print(f"submitted {job_id} to {args.address}: {shown(command)}", flush=True)
    if not args.wait:
        print(f"follow it with: ray job logs --follow --address {args.address} {job_id}", flush=True)
        return EXIT_OK
    info = wait_for(client, job_id)
    code = exit_code(info)
    print(f"job {job_id} {info.status.value}" + (f": {info.message}" if info.message else ""), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

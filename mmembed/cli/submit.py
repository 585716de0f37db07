"""`mmembed submit`'s work: an mmembed command line checked here, sent to a Ray cluster's job server
(Ray's Job Submission API) as `python -m mmembed.cli <command ...>`, and followed to its exit code."""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import time

EXIT_OK, EXIT_FAILED = 0, 1


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
    flags = credential_flags(command)
    if flags:
        return (
            f"{', '.join(flags)} holds credentials, and a submitted job's command line is shown to anyone who can "
            "read the cluster's job list or dashboard. Give the job its credentials through the cluster's "
            "credential chain (an instance or pod role, e.g. IRSA or workload identity), or as environment "
            "variables of the job: --runtime-env '{\"env_vars\": {\"AWS_ACCESS_KEY_ID\": \"...\", "
            "\"AWS_SECRET_ACCESS_KEY\": \"...\"}}'. Nothing was submitted"
        )
    return None


def credential_flags(command: list[str]) -> list[str]:
    """The options of `command` whose values hold credentials (what a manifest redacts)."""
    from mmembed.outputs.manifest import redact_argv

    flags = set()
    for i, (mine, shown) in enumerate(zip(command, redact_argv(command))):
        if mine != shown:
            flags.add(mine.split("=", 1)[0] if mine.startswith("--") else command[i - 1])
    return sorted(flags)


def entrypoint(command: list[str]) -> str:
    return shlex.join(["python", "-m", "mmembed.cli", *command])


def shown(command: list[str]) -> str:
    """The entrypoint as printed: credentials redacted, should any reach here."""
    from mmembed.outputs.manifest import redact_argv

    return entrypoint(redact_argv(command))


def job_client(address: str):
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

"""The run manifest (`_manifest.json`) and the one-screen run report."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from typing import Any

from mmembed.storage.fs import filesystem, with_retries

MANIFEST_NAME = "_manifest.json"
_SECRET_HINTS = ("key", "secret", "token", "password", "session", "credential", "auth")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("mmembed", "ray", "torch", "transformers", "sentence-transformers", "pyarrow", "fsspec", "s3fs",
                 "pillow", "torchcodec"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def redact_options(options: dict | None) -> dict:
    """Storage options with credential values masked, fit for manifests and logs."""
    out = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact_options(v)
        elif any(h in k.lower() for h in _SECRET_HINTS):
            out[k] = "***"
        else:
            out[k] = v
    return out


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with JSON storage options redacted."""
    out = list(argv)
    for i, a in enumerate(out):
        for flag in ("--storage-options",):
            if a == flag and i + 1 < len(out):
                out[i + 1] = _redact_json(out[i + 1])
            elif a.startswith(flag + "="):
                out[i] = flag + "=" + _redact_json(a.split("=", 1)[1])
    return out


def _redact_json(text: str) -> str:
    try:
        return json.dumps(redact_options(json.loads(text)))
    except (ValueError, AttributeError):
        return "***"


def write_json(uri: str, payload: dict, storage_options: dict | None = None) -> None:
    """Write JSON atomically where the filesystem allows (rename), else in one PUT."""
    fs, path = filesystem(uri, storage_options)
    data = json.dumps(payload, indent=2, sort_keys=False, default=str).encode()
    tmp = path.rsplit("/", 1)[0] + "/.tmp-" + path.rsplit("/", 1)[1]

    def put():
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)

    with_retries(put)


def read_json(uri: str, storage_options: dict | None = None) -> dict | None:
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def report(title: str, manifest: dict[str, Any], output: str) -> str:
    c = manifest["counts"]
    secs = max(manifest.get("duration_s", 0.0), 1e-9)
    lines = [
        f"{title}: {manifest['status']} in {secs:.1f} s",
        f"  records  {c['records']:>10,}   ({c['records'] / secs:,.1f} records/s)",
        f"  written  {c['written']:>10,}   in {len(manifest.get('files', []))} shard(s) -> {output}",
        f"  errors   {c['errors']:>10,}   in {len(manifest.get('error_files', []))} shard(s) -> {output.rstrip('/')}/_errors",
    ]
    if c.get("by_modality"):
        lines.append("  by modality: " + ", ".join(f"{k} {v:,}" for k, v in sorted(c["by_modality"].items())))
    m = manifest.get("model", {})
    if m:
        # Embedding jobs have a dim and a normalize setting; rerank and search jobs have neither.
        details = "".join(f" {k}={m[k]}" for k in ("dim", "normalize", "task") if m.get(k) is not None)
        lines.append(f"  model    {m.get('name')} @ {m.get('revision')}" + (f" {details}" if details else ""))
        mv = m.get("multi_vector")
        if isinstance(mv, dict) and "vectors" in mv:
            lines.append(f"  vectors  {mv['vectors']:,} ({mv['vectors_per_record']} per record, "
                         f"{mv['bytes_per_record']:,.0f} B per record as {m.get('precision')}, "
                         f"{mv['stored_bytes_per_record']:,.0f} B stored); scored with {mv['similarity_fn_name']}")
    if manifest.get("device_use"):
        from mmembed.models.device_use import describe

        lines.append(describe(manifest["device_use"]))
    if c.get("unaccounted"):
        lines.append(f"  WARNING  {c['unaccounted']:,} input records are neither written nor error rows")
    return "\n".join(lines)


def command_line() -> list[str]:
    return redact_argv(list(sys.argv))

"""Entry point: embed a corpus (`mmembed embed`).

    python -m pipelines.embed --input PATH_OR_URI --output URI --model NAME_OR_PATH [options]

The job itself is mmembed/jobs/embed.py.
"""

from __future__ import annotations

import argparse

from mmembed.cli.options import (
    add_embed_run_options,
    add_embedding_options,
    add_executor_options,
    add_input_options,
    add_io_options,
    add_model_options,
    add_runtime_options,
    job_main,
)


def build_parser(prog: str = "mmembed embed") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Embed a corpus of texts, images, audio, video or multimodal records with a "
        "sentence-transformers model, on Ray. Results equal SentenceTransformer.encode on the same inputs.",
        epilog="Input: a Parquet manifest (file, directory or glob) with a string `id` column and one or more of "
        "text, image, audio, video (media cells are URIs/paths or raw bytes; audio may also be an "
        "{array, sampling_rate} struct), or a `messages` column of chat-message lists ({role, content}, content "
        "a string or a list of {type, text|image|audio|video} parts), or a directory/glob of media files "
        "(id = path relative to the root, modality from the extension). Output: part-*.parquet "
        "(id, embedding, modality), _errors/*.parquet (id, stage, error) and _manifest.json. "
        "Exit codes: 0 ok, 2 bad usage (nothing ran), 3 more errors than --max-error-fraction, 1 job failed.",
    )
    p.add_argument("--input", required=True, help="Manifest or media directory/glob: local path or fsspec URI.")
    p.add_argument("--output", required=True, help="Output directory: local path or fsspec URI (e.g. s3://b/p).")
    add_input_options(p)
    add_model_options(p)
    add_embed_run_options(add_embedding_options(p))
    add_executor_options(add_runtime_options(p))
    add_io_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mmembed.jobs.config import EmbedConfig, from_args
    from mmembed.jobs.embed import EmbedJob
    from mmembed.jobs.runner import run

    return job_main("embed", build_parser(), lambda args: run(EmbedJob(from_args(EmbedConfig, args))), argv)


if __name__ == "__main__":
    from mmembed.cli.options import exit_process

    exit_process(main())

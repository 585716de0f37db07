"""Command-line options shared by the embed, rerank and reembed jobs.

Options mirror ST's argument names where ST has one. Parsing is pure: nothing here starts
Ray or loads a model, so `--help` and option errors are instant.
"""

from __future__ import annotations

import argparse
import json
import os

from mmembed.errors import EXIT_FAILED, EXIT_USAGE, JobError, UsageError  # noqa: F401 - re-exported: jobs raise it from here


def job_main(name: str, parser: argparse.ArgumentParser, run, argv: list[str] | None) -> int:
    """Parse, run, and turn a UsageError into its message and exit code 2."""
    import logging
    import sys

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except UsageError as exc:
        print(f"mmembed {name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as exc:
        print(f"mmembed {name}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def exit_process(code: int):
    """sys.exit(code) for a job run as its own process (console script, `python -m`, `python pipelines/...`).

    Interpreter shutdown runs a full cyclic garbage collection over every object torch,
    transformers and ST built at import (seconds on a small machine: benchmarks/RESULTS.md, "A cold job's fixed cost"),
    for memory the process is about to give back anyway. Freezing moves those objects out of the collector's
    sight; shutdown is otherwise unchanged (atexit handlers such as ray.shutdown run, streams
    flush). Outputs never depend on it: every shard, manifest and lease is closed explicitly
    before a job returns. Not for in-process callers of main(), whose later garbage must stay
    collectable.
    """
    import gc
    import sys

    gc.freeze()
    sys.exit(code)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"key\": \"value\"}'")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def add_model_options(p: argparse.ArgumentParser, *, required: bool = True, purpose: str = "") -> None:
    """--model and how to load it; `purpose` starts --model's help (e.g. search's raw queries)."""
    g = p.add_argument_group("model (as in sentence-transformers)")
    g.add_argument(
        "--model",
        required=required,
        help=purpose + "Hub name (e.g. sentence-transformers/clip-ViT-B-32, Qwen/Qwen3-VL-Embedding-2B) or a local "
        "directory. Set HF_HUB_OFFLINE=1 to load only from the local cache.",
    )
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model.")
    g.add_argument(
        "--model-kwargs",
        type=json_object,
        default={},
        help='JSON passed to the transformers model, e.g. \'{"dtype": "bfloat16", "attn_implementation": "sdpa"}\'.',
    )
    g.add_argument(
        "--processor-kwargs",
        type=json_object,
        default={},
        help='JSON passed to the processor, e.g. \'{"min_pixels": 3136, "max_pixels": 360000}\'. Video frame '
        "sampling follows the video processor's settings, so '{\"fps\": 1, \"max_frames\": 32}' (or "
        "'{\"num_frames\": 8, \"fps\": null}') changes which frames are decoded.",
    )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow model repositories to run their own code (off by default).",
    )


def add_runtime_options(p: argparse.ArgumentParser):
    """Ray, pools and batches; returns the group, for a job's own compute options."""
    g = p.add_argument_group("compute")
    g.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS; without either, Ray starts in-process).",
    )
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="Encoder device (default: auto).")
    g.add_argument("--batch-size", type=positive_int, default=32, help="Rows per forward pass (default: 32).")
    g.add_argument(
        "--num-encoders",
        type=positive_int,
        default=None,
        help="Encoder actors (default: one per GPU in the cluster, or 1 on CPU).",
    )
    g.add_argument(
        "--calls-per-encoder",
        type=positive_int,
        default=None,
        help="Batches each encoder actor works on at once (default: 2 on CUDA, 1 on CPU). With 2, one "
        "call's host work (Arrow rows to tensors, the copy to the GPU, the embeddings back) runs while the "
        "other call's forward pass holds the GPU, so the GPU does not wait between batches; it costs one more "
        "batch of GPU memory. On CPU the calls would only compete for the same cores.",
    )
    g.add_argument(
        "--copy-mode",
        choices=["staged", "pinned", "plain"],
        default="staged",
        help="How a batch reaches the GPU (default: staged). staged: through pinned host buffers each encoder "
        "keeps and reuses, copied on a side stream so the copy overlaps other work; pinned: through freshly "
        "pinned memory per batch; plain: a blocking copy. benchmarks/gpu.py measures which wins on a card. "
        "No effect on CPU.",
    )
    g.add_argument(
        "--num-preprocessors",
        type=positive_int,
        default=None,
        help="Preprocess (fetch + decode + processor) actors (default: sized from the cluster's CPUs).",
    )
    g.add_argument(
        "--preprocess-batch-size", type=positive_int, default=16, help="Records per preprocess call (default: 16)."
    )
    g.add_argument(
        "--gpus-per-encoder",
        type=float,
        default=1.0,
        help="GPUs per encoder actor; fractions (0.5, 0.25) pack several small-model encoders on one GPU.",
    )
    g.add_argument("--cpus-per-encoder", type=float, default=None, help="CPUs per encoder actor (default: 1).")
    g.add_argument(
        "--cpus-per-preprocessor",
        type=float,
        default=None,
        help="CPUs per preprocess actor (default: 1, or less to fit a small machine).",
    )
    g.add_argument(
        "--memory-per-preprocessor",
        type=int,
        default=None,
        help="Memory (bytes) reserved per preprocess actor, so Ray places no more on a node than it holds "
        "(default: 1 GiB, about what one uses on screenshots; a default-sized pool is also capped at three "
        "quarters of the cluster's memory).",
    )
    g.add_argument(
        "--encoder-resources",
        type=json_object,
        default={},
        help='Custom Ray resources per encoder actor, e.g. \'{"gpu_node": 1}\'.',
    )
    g.add_argument(
        "--preprocessor-resources",
        type=json_object,
        default={},
        help='Custom Ray resources per preprocess actor, e.g. \'{"cpu_node": 1}\'.',
    )
    g.add_argument(
        "--transport-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="Send pixel tensors from the CPU pool to the encoders in this dtype (halves float32's bytes, not "
        "exact). Default: uint8 pixels, with the processor's rescale and normalise applied on the encoder's "
        "device, wherever that gives the processor's own values (checked before the run, recorded as "
        "model.pixels in the manifest; a quarter of float32's bytes); else the processor's own dtype.",
    )
    g.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=None,
        help="Token budget per forward pass: a batch holds rows while rows x its longest sequence stays "
        "within N (still at most --batch-size rows). Keeps VLM batches of mixed-size images even in cost "
        "and padding low (default: no budget, batches of --batch-size rows).",
    )
    g.add_argument(
        "--max-batch-patches",
        type=positive_int,
        default=None,
        help="Vision-patch budget per forward pass for VLMs that pack image patches (Qwen-VL); "
        "default: no budget.",
    )
    g.add_argument(
        "--encode-window",
        type=positive_int,
        default=None,
        help="Rows each encoder call receives and sorts by length before forming batches; a window of "
        "several batches lets similar lengths share a batch (default: --batch-size).",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model's towers in each encoder (slow first batches; pays off on long runs "
        "on GPU). For flash attention pass --model-kwargs '{\"attn_implementation\": \"flash_attention_2\"}' "
        "with the flash-attn package installed.",
    )
    add_executor_option(g)
    g.add_argument(
        "--placement-timeout",
        type=float,
        default=600.0,
        help="Seconds a Ray job waits for the cluster to place its planned actor pools before it exits 1 "
        "saying so (nothing written), instead of waiting for actors that cannot start, e.g. when a node was "
        "just lost. Pools are planned from the nodes that answer; an autoscaler sees the wait as demand "
        "(default: 600; 0: do not check).",
    )
    return g


def add_embedding_options(p: argparse.ArgumentParser):
    """Options that decide the vectors (prompt, task, normalisation, dim, precision, token pooling); returns
    the group."""
    g = p.add_argument_group("embedding (as in SentenceTransformer.encode)")
    g.add_argument(
        "--task",
        choices=["query", "document"],
        default=None,
        help="Encode as encode_query / encode_document would: the model's query/document prompt and task.",
    )
    g.add_argument("--prompt-name", default=None, help="A key of the model's `prompts`.")
    g.add_argument("--prompt", default=None, help="A literal prompt (wins over --prompt-name).")
    g.add_argument("--normalize", action="store_true", help="L2-normalise embeddings (normalize_embeddings=True).")
    g.add_argument("--truncate-dim", type=int, default=None, help="Keep the first N dimensions (Matryoshka).")
    g.add_argument(
        "--precision",
        choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"],
        default="float32",
        help="Stored embedding precision. int8/uint8 and binary/ubinary are sentence-transformers' "
        "quantize_embeddings: int8/uint8 map each dimension's [min, max] calibration range onto 256 buckets "
        "(one range for the whole corpus, see --calibration-records); binary/ubinary keep the sign bit, 8 "
        "dimensions packed per byte (the dim must be a multiple of 8). Default: float32.",
    )
    g.add_argument(
        "--calibration-records",
        type=positive_int,
        default=1000,
        help="int8/uint8: embed the first N input records before the main pass and take each dimension's "
        "[min, max] over them as the corpus-wide quantisation range (recorded in _manifest.json; a resumed run "
        "reuses it). Default: 1000.",
    )
    g.add_argument(
        "--calibration-embeddings",
        default=None,
        help="int8/uint8: take the ranges from a finished float `mmembed embed` output of the same model instead "
        "(e.g. a representative sample embedded beforehand).",
    )
    g.add_argument(
        "--keep-float",
        action="store_true",
        help="With a quantised --precision, also store the float32 vectors in an `embedding_float` column, which "
        "`mmembed search` uses to rescore the quantised hits.",
    )
    g.add_argument(
        "--token-pool-factor",
        type=float,
        default=None,
        help="Multi-vector models: pool each document's token vectors to about 1/F of their count with "
        "sentence-transformers' HierarchicalTokenPooling (as encode_document(token_pooling=...)), to store less. "
        "Default: no pooling.",
    )
    g.add_argument(
        "--token-pool-protected",
        type=int,
        default=1,
        help="With --token-pool-factor: leading tokens kept out of pooling (the [CLS]; 0 as colpali-engine). "
        "Default: 1.",
    )
    add_on_unsupported_option(g, "embed", "records")
    return g


def modality_list(text: str) -> tuple[str, ...]:
    from mmembed.inputs.discover import MODALITIES

    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [v for v in values if v not in MODALITIES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(MODALITIES)}; got {text!r}")
    return values


def add_input_options(p: argparse.ArgumentParser) -> None:
    """Corpora as they arrive: which manifest column is which, and which modalities to embed."""
    g = p.add_argument_group(
        "input columns",
        "A manifest's columns, named as your corpus names them: e.g. an img2dataset shard "
        "`--id-column key --image-column jpg --text-column txt`. A Hugging Face datasets Image or Audio column "
        "(struct of bytes and path) is read as it is. A named column the manifest lacks is refused before "
        "anything runs. Recorded in _manifest.json and in the run's identity.",
    )
    for field, default in (("id", "id"), ("text", "text"), ("image", "image"), ("audio", "audio"), ("video", "video")):
        g.add_argument(f"--{field}-column", default=default, metavar="NAME",
                       help=f"The column holding each record's {field} (default: {default}).")
    g.add_argument(
        "--modalities",
        type=modality_list,
        default=None,
        help="Embed only these modalities of each record, comma-separated (text, image, audio, video, message), "
        "e.g. `image` to embed a shard's photos and not their captions; in a folder of media files, files of "
        "other modalities are skipped. Default: every modality a record holds.",
    )
    d = p.add_argument_group(
        "documents",
        "Each PDF (a .pdf file of a folder, or a `pdf` manifest column of paths, URIs or bytes) is one record per "
        "page, id `<document id>#page=<n>`, rendered with pypdfium2 (pip install \"mmembed[pdf]\") in the CPU "
        "pool at the size the model's image processor keeps: a CLIP-style processor's shortest edge, a "
        "Qwen-VL-style processor's max_pixels. A document that cannot be opened (corrupt, password-protected, "
        "empty, over --max-bytes) is one error row; a page over --max-image-pixels is an error row of its own.",
    )
    d.add_argument("--pdf-dpi", type=positive_float, default=None,
                   help="Render pages at this resolution instead (72 = one pixel per PDF point).")
    d.add_argument("--max-pages", type=positive_int, default=None,
                   help="Take at most the first N pages of each document (default: every page).")


def add_embed_run_options(g) -> None:
    """The embed job's own: what a rerun into the same --output does, and --split-modalities."""
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="Discard whatever --output holds (a finished run, or an unfinished one of another model, prompt "
        "or input) and start afresh. Without it, rerunning the same command resumes an interrupted run "
        "(committed shards are kept, only the rest is embedded) or does nothing if it finished.",
    )
    g.add_argument(
        "--retry-errors",
        action="store_true",
        help="Embed again the records that earlier attempts at this output wrote as error rows (a fetch "
        "that timed out, a file uploaded since), finished run or not; their old error rows are dropped "
        "first, and whatever fails again becomes a new error row. Without it, a rerun keeps error rows "
        "as they are.",
    )
    g.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="Lease on --output (`_lock.json`) that keeps a second run from writing into it; the running job "
        "renews it every quarter of this. A lease of a crashed run on another host is taken over once it "
        "is this old; on the same host, as soon as its process is gone (default: 60).",
    )
    g.add_argument(
        "--split-modalities",
        action="store_true",
        help="Embed each modality of a record on its own, as CLIP-style models need: a record with text "
        "and an image gives two rows. Every output id becomes `<id>#<modality>` (modality: text, image, "
        "audio, video or message; the source id is everything before the last `#`). Without it, a "
        "record with several modality cells is one multimodal input, which needs a model that supports "
        "`message` (e.g. a Qwen3-VL embedder). Such records in the first 1,000 rows of a manifest fail the job "
        "before Ray starts; later ones become error rows that say so.",
    )


def add_executor_option(compute) -> None:
    """--executor, for every command with compute options."""
    from mmembed.executors.cluster import RECORDS_PER_PREPROCESSOR

    compute.add_argument(
        "--executor",
        choices=["auto", "ray", "local"],
        default="auto",
        help="Where the stages run. ray: a Ray Data pipeline with CPU and GPU actor pools (on --address, "
        "or an in-process Ray). local: in this process, without Ray: for small inputs, which a Ray job "
        "would spend most of its time starting (Ray itself, then one process per actor importing torch "
        "and sentence-transformers). auto (default): local when no cluster is given (no --address, no "
        "$RAY_ADDRESS, Ray not already started in this process), no pool size is set, and the input is "
        f"no bigger than one preprocess actor's share ({RECORDS_PER_PREPROCESSOR['media']:,} media or "
        f"{RECORDS_PER_PREPROCESSOR['text']:,} text records, pairs or queries); ray otherwise. Outputs are "
        "the same either way.",
    )


def add_executor_options(compute) -> None:
    """The embed job's own compute options: decoding on the device, or decoding less (--fast-decode)."""
    from mmembed.media.device_decode import HW_DECODE_SHARE

    compute.add_argument(
        "--fast-decode",
        action="store_true",
        help="Opt-in, NOT equal to sentence-transformers: JPEGs at least twice the processor's target size are "
        "decoded at a half, quarter or eighth of their size in libjpeg-turbo's DCT domain (Pillow's draft mode), "
        "never below the target, before the processor resizes them. Faster decoding of large photos; the "
        "pixels differ from a full decode (README, \"Fast decode\", gives the measured cosine). For processors "
        "that resize to a shortest edge (CLIP-style); refused otherwise. Recorded in the manifest.",
    )
    compute.add_argument(
        "--decode-on-device",
        action="store_true",
        help="JPEG photos are decoded (nvJPEG) and preprocessed by the encoders on their GPU, with the model's "
        "own image processor; the CPU pool only fetches their bytes and reads their headers. For CLIP-style "
        "models, whose rate on a GPU node is otherwise the CPU pool's decode rate. PNG, WebP, grey, CMYK, "
        "progressive and EXIF-rotated images are still decoded by the CPU pool, record by record. Embeddings "
        "match ST's within JPEG decoder rounding (cosine >= 0.999). Refused for models whose image features "
        "are not CLIP-style pixel_values. On a CPU encoder the same code runs on the CPU.",
    )
    compute.add_argument(
        "--device-decoder",
        choices=["auto", "nvimgcodec", "torchvision"],
        default="auto",
        help="Which decoder --decode-on-device uses (default auto: nvImageCodec where installed, pip install "
        "'mmembed[nvimgcodec-cu13]' or '-cu12' to match torch's CUDA, else torchvision's nvJPEG). nvImageCodec "
        "decodes a batch at once and splits it between the GPU's hardware JPEG engines (A100, H100, H200) and its "
        "CUDA cores (--hw-decode-share); torchvision's nvJPEG is one decoder per process. Recorded in the manifest.",
    )
    compute.add_argument(
        "--hw-decode-share",
        type=float,
        default=HW_DECODE_SHARE,
        help="With nvImageCodec: the share of each batch's JPEGs given to the hardware decode engines, the rest "
        f"decoded on CUDA cores (default {HW_DECODE_SHARE}, after DALI's published A100 figures; not yet "
        "measured on a card: benchmarks/gpu.py --hw-shares sweeps it). 0 keeps everything on CUDA cores, 1 on "
        "the engines. Cards without the engines use CUDA cores for all.",
    )


def add_on_unsupported_option(g, verb: str, rows: str) -> None:
    g.add_argument(
        "--on-unsupported",
        choices=["fail", "error-row"],
        default="fail",
        help=f"A modality in the input that the model cannot {verb}: fail before Ray starts (default), or "
        f"write those {rows} as error rows and {verb} the rest.",
    )


def add_storage_option(p) -> None:
    """`--storage-options`, for every command that touches an fsspec URI."""
    p.add_argument(
        "--storage-options",
        type=json_object,
        default={},
        help='fsspec storage options for object stores, e.g. \'{"endpoint_url": "http://127.0.0.1:9000", '
        '"anon": false}\'. Credentials come from the standard AWS chain and are never written out.',
    )


def add_io_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage")
    add_storage_option(g)
    g.add_argument("--allow-http", action="store_true", help="Fetch http(s):// media URLs (refused by default).")
    g.add_argument(
        "--http-timeout",
        type=positive_float,
        default=30.0,
        help="Seconds one try of an http(s):// media fetch may take: connecting, the answer and every byte "
        "of the body, redirects included. A timed-out, cut-short or 5xx/429 answer is tried again, 5 tries in "
        "all with backoff of a few seconds between them, so a dead URL costs at most about 5x this; then the "
        "record becomes an error row naming the URL and the cause (default: 30).",
    )
    g.add_argument(
        "--max-bytes",
        type=positive_int,
        default=256 * 1024 * 1024,
        help="Largest media object fetched, in bytes; larger ones become error rows, whether or not the server "
        "declares the size: a body is read only up to this many bytes (default: 256 MiB).",
    )
    g.add_argument(
        "--fetch-threads",
        type=positive_int,
        default=8,
        help="Threads per preprocess actor that fetch and decode the records of a batch: they hide "
        "object-storage latency and decode in parallel (default: 8; 1 fetches one record at a time).",
    )
    g.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=89_478_485,
        help="Largest decoded image (width x height); larger ones become error rows (default: Pillow's 89.5M).",
    )
    g.add_argument(
        "--shard-rows", type=positive_int, default=50_000, help="Most rows per output shard (default: 50000)."
    )
    g.add_argument(
        "--max-error-fraction",
        type=fraction,
        default=1.0,
        help="Exit non-zero when more than this fraction of records fail (output and error rows are "
        "still written; default: 1.0, never).",
    )


def add_judgement_options(g, *, required: bool = True) -> None:
    """--queries and --qrels: the relevance judgements `evaluate` and the --if-better gates score with."""
    g.add_argument("--queries", required=required, default=None,
                   help="Queries: BEIR's queries.jsonl (`_id`, `text` per line) or Parquet with `id` and the embed "
                   "job's input columns (text, image, ...: e.g. text queries against a screenshot corpus); a file "
                   "or a folder of *.parquet, local or fsspec URI. They are embedded as encode_query would, with "
                   "the model and settings recorded for the version.")
    g.add_argument("--qrels", required=required, default=None,
                   help="Relevance judgements: BEIR's qrels/<split>.tsv (query-id, corpus-id, score, with that "
                   "header) or Parquet with query_id, corpus_id, score. As in ST's InformationRetrievalEvaluator, "
                   "a judged document with score > 0 is relevant; queries with none are not scored.")


def add_evaluation_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """What `mmembed evaluate` and `mmembed activate --if-better` share: judgements, k's, compute, storage."""
    from mmembed.jobs.evaluate import k_list

    g = p.add_argument_group("evaluation")
    add_judgement_options(g, required=required)
    g.add_argument("--k", type=k_list, default=(1, 3, 5, 10, 100),
                   help="Cut-offs of every metric, comma-separated (default: 1,3,5,10,100).")
    g.add_argument("--recompute", action="store_true",
                   help="Evaluate again even when the snapshot's _eval/ folder records an evaluation on the same "
                   "queries and qrels files (same fingerprints), e.g. after replacing query images in place.")
    g.add_argument("--work-dir", default=None,
                   help="Where the query embeddings and top-k lists are written while evaluating, removed after "
                   "(default: ROOT/_work/ for a store, a local temporary folder for an embed output; on a "
                   "multi-node cluster give a URI every node can write).")
    g.add_argument("--query-batch-size", type=positive_int, default=None,
                   help="Queries scored per pass over the corpus (default: all of them up to 8,192: one pass).")
    g.add_argument("--corpus-block-rows", type=positive_int, default=None,
                   help="Corpus vectors scored at a time (default: 2^25 / the query batch, at least 1,024).")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="Let the version's model run code from its repository when it loads (as ST's option).")
    g.add_argument("--lease-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    add_runtime_options(p)
    add_io_options(p)


def add_gate_options(g, flag: str) -> None:
    """The upgrade gate (`activate --if-better`, `reembed --activate-if-better`): the flag, metric and margin."""
    if flag == "--if-better":
        g.add_argument("--if-better", action="store_true", help="Evaluate this version and CURRENT on --queries and "
                       "--qrels (reusing recorded evaluations of the same files) and activate only when this "
                       "version's --metric is at least CURRENT's plus --min-gain; otherwise keep CURRENT and exit 4.")
    else:
        g.add_argument(flag, action="store_true", help="Once a new version commits, evaluate it and CURRENT on "
                       "--queries and --qrels and point CURRENT at it only when its --metric is at least CURRENT's "
                       "plus --min-gain (as `mmembed activate --if-better`); otherwise keep CURRENT and exit 4. "
                       "Runs of the current version, and the first run in a store, move CURRENT as usual.")
        add_judgement_options(g, required=False)
    g.add_argument("--metric", default="ndcg@10", help="The metric the gate compares, as ST keys it "
                   "(accuracy|precision|recall|mrr|ndcg|map @k; default: ndcg@10).")
    g.add_argument("--min-gain", type=float, default=0.0, help="How much better than CURRENT the version must be "
                   "(default: 0.0: at least as good). Every decision, with both figures, is kept in ROOT/_decisions/.")

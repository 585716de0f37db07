"""Do the CPU stages keep an accelerator busy? Measured without one, in one run.

    .venv/bin/python benchmarks/feed.py [--workloads clip_photos,qwen3vl_shots] [--seconds 60] [--smoke]
    .venv/bin/python benchmarks/feed.py --workloads pdf_pages,wds_s3 [--seconds 30] [--repeats 2] [--smoke]

The encoder is replaced by stand-ins (mmembed/testing/standin.py) inside the real pipeline
(mmembed.jobs.embed: manifest -> fetch/decode/preprocess pool -> encoder pool -> Parquet):
- P, preprocess only: a null encoder, so the job runs at the rate of its CPU stages;
- R, encoder only: a rate-limited encoder that does the real host work (collate, copy to the
  device) and holds each batch for rows / R seconds, like an accelerator of forward rate R.
  Checked on its own, in this process, on preprocessed rows: it must reach R within 2%;
- E, end to end: the real pipeline with that encoder, for R = 0.5 P, 1.0 P and 2 P.

efficiency = E / min(P, R): 1.0 means the pipeline is as fast as its slower half allows.

Two rates are measured for every job pair, a job of N/2 and one of N records (N sized so the
larger job runs about --seconds): the marginal rate between them (fixed costs such as actor
start-up cancel) and the larger job's rate while its shards stream (the first 10% of rows
left out). P, and so R, is the streaming rate: on 2 CPUs a job's start-up varies by seconds
from run to run, as much as the marginal time of thousands of records. Efficiency is printed
from both E figures, with the whole-job rate beside them.

The encoder actor runs --calls-per-encoder calls at once (default 2, as mmembed does on a GPU),
and the stand-in's rate check feeds it from as many threads.

Inputs are Parquet manifests cycling over generated files, the same
files for every job: CLIP-shape photos (640x480 JPEG, 224 crop, a tiny random-weight CLIP) and
Qwen3-VL-shape screenshots (1280x800 PNG, 360,000-pixel budget, a tiny random-weight Qwen3-VL
with the real processor settings).

Two comparisons, selected by name and not in the default run (which already takes about 30
minutes on 2 CPUs), put two forms of one corpus through the same pipeline with the null encoder,
so each side runs at the rate of its CPU stages. The sides alternate, A, B, A, B (--repeats
rounds), every job gets the same --num-preprocessors, and the medians and each pair's B/A ratio
are printed, from the rate while shards stream and from the whole job:
- pdf_pages: the qwen3vl_shots screenshots as PNG records (A, screenshots/s) against PDFs built
  from them (mmembed/testing/corpus.py pdf_corpus), 8 pages each, one screenshot per page at 72 dpi,
  so a page is the screenshot's size (B, pages/s: pypdfium2 renders each page at the processor's
  max_pixels, then the processor runs). Pillow stores the pages as JPEG, so B decodes JPEG where
  A decodes PNG. One PreprocessStage call in this process on each side is printed too.
- wds_s3: the clip_photos JPEGs on a moto S3 server that the benchmark starts, once as one object
  per image behind a Parquet manifest of s3:// URIs (A), once packed into WebDataset tar shards
  of --shard-records records with jpg + txt members (B), both with `--modalities image`;
  records/s of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmembed.testing.corpus import corpus, pdf_corpus  # noqa: E402 - the corpora and models gpu.py measures too
from mmembed.testing.moto import moto_s3, s3_bucket  # noqa: E402
from mmembed.testing.rates import steady_rate  # noqa: E402
from mmembed.testing.shapes import build_model  # noqa: E402

WORKLOADS = {
    # name: model (mmembed/testing/shapes.py build_model), corpus kind, distinct files, pipeline options
    "clip_photos": {"model": "clip_b32", "corpus": "photos", "files": 1024, "pilot": 1200, "options": []},
    "qwen3vl_shots": {
        "model": "qwen3vl",
        "corpus": "shots",
        "files": 256,
        "pilot": 240,
        # As on a GPU run: pixels cross the object store in bf16, the processor's budget bounds patches.
        "options": ["--transport-dtype", "bfloat16", "--preprocess-batch-size", "4"],
    },
}
R_FACTORS = (0.5, 1.0, 2.0)


def write_manifest(path: Path, files: list[str], n: int, column: str = "image") -> Path:
    """`n` records cycling over `files`: every job reads the same bytes, only more of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        ids = [f"r{i:08d}" for i in range(n)]
        pq.write_table(pa.table({"id": ids, column: [files[i % len(files)] for i in range(n)]}), path)
    return path


class Bench:
    def __init__(self, args, name: str, spec: dict, model_dir: str, files: list[str]):
        self.args, self.name, self.spec, self.model_dir, self.files = args, name, spec, model_dir, files
        self.work = Path(args.workdir) / "feed" / name
        self.work.mkdir(parents=True, exist_ok=True)

    def argv(self, manifest: Path | str, out: Path, n: int, extra: tuple = ()) -> list[str]:
        argv = ["--input", str(manifest), "--output", str(out), "--model", self.model_dir, "--device", "cpu",
                "--batch-size", str(self.args.batch_size), "--shard-rows", str(max(8, n // 40)), "--overwrite",
                "--calls-per-encoder", str(self.args.calls_per_encoder)]
        return argv + list(extra) + self.spec["options"] + self.args.job_options

    def job(self, n: int, stage, kwargs: dict, label: str) -> dict:
        """One embed job over n records with `stage` in place of the encoder; wall time and counts."""
        manifest = write_manifest(self.work / f"manifest-{n}.parquet", self.files, n)
        return self.execute(str(manifest), n, stage, kwargs, label)

    def execute(self, source: str, n: int, stage, kwargs: dict, label: str, extra: tuple = ()) -> dict:
        """One embed job over `source` (any --input), which must write n rows, with `extra` options."""
        from mmembed import cli
        from mmembed.jobs.embed import EmbedJob
        from mmembed.jobs.runner import run
        from mmembed.stages.encode import EncodeStage

        out = self.work / f"out-{label}-{n}"
        job = EmbedJob(cli.parse("embed", self.argv(source, out, n, extra)),
                       replacements={EncodeStage: (stage, kwargs)})
        t0 = time.perf_counter()
        rc = run(job)
        wall = time.perf_counter() - t0
        manifest_json = json.loads((out / "_manifest.json").read_text())
        counts = manifest_json["counts"]
        if rc != 0 or counts["written"] != n or counts["errors"]:
            raise SystemExit(f"feed.py: job {label} over {n} records failed: rc={rc} counts={counts}")
        streaming = steady_rate(str(out), manifest_json["files"], wall)
        shutil.rmtree(out, ignore_errors=True)
        self.log(f"{label:>10} n={n:<7} {wall:7.1f} s  {n / wall:8.1f} rec/s whole job"
                 + (f", {streaming:8.1f} rec/s while shards stream" if streaming else ""))
        return {"n": n, "wall_s": wall, "rate": n / wall, "streaming_rate": streaming,
                "resources": manifest_json["resources"]}

    def pair(self, n_big: int, stage, kwargs: dict, label: str) -> dict:
        """Jobs of n_big / 2 and n_big records; the marginal rate between them.

        --smoke runs the larger job only: tiny jobs are all fixed cost, their difference is noise.
        """
        if self.args.smoke:
            big = self.job(n_big, stage, kwargs, label)
            return {"small": None, "big": big, "marginal_rate": None}
        small = self.job(n_big // 2, stage, kwargs, label)
        big = self.job(n_big, stage, kwargs, label)
        dt = big["wall_s"] - small["wall_s"]
        marginal = (big["n"] - small["n"]) / dt if dt > 0 else None
        return {"small": small, "big": big, "marginal_rate": marginal}

    def log(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", flush=True)

    # -- the encoder alone ----------------------------------------------------------------
    def preprocessed_sample(self, k: int):
        """k records through the real PreprocessStage, in this process."""
        import pyarrow.parquet as pq

        from mmembed.models.loading import ModelSpec
        from mmembed.stages.preprocess import PreprocessStage
        from mmembed.stages.read import normalize_manifest_table

        manifest = write_manifest(self.work / f"manifest-{k}.parquet", self.files, k)
        records = normalize_manifest_table(pq.read_table(manifest), "")
        transport = None
        if "--transport-dtype" in self.spec["options"]:
            transport = self.spec["options"][self.spec["options"].index("--transport-dtype") + 1]
        stage = PreprocessStage(ModelSpec(self.model_dir), transport_dtype=transport)
        t0 = time.perf_counter()
        table = stage(records)
        rate = k / (time.perf_counter() - t0)
        assert table.column("error").null_count == table.num_rows, "preprocess errors in the sample"
        return table, rate

    def encoder_check(self, sample, rate: float, seconds: float) -> dict:
        """The stand-in's own rate on preprocessed rows, fed as the pipeline feeds it: windows of
        --batch-size rows, from --calls-per-encoder threads at once (Ray's threads in the job)."""
        import threading

        from mmembed.models.loading import ModelSpec
        from mmembed.testing.standin import RateLimitedEncoder

        window, calls = self.args.batch_size, self.args.calls_per_encoder
        enc = RateLimitedEncoder(ModelSpec(self.model_dir), rate=rate, device="cpu", batch_size=self.args.batch_size)
        blocks = [sample.slice(i, window) for i in range(0, sample.num_rows - window + 1, window)]
        enc(blocks[0])  # first-call allocations stay out of the figure
        done = [0] * calls
        t0, cpu0 = time.perf_counter(), time.process_time()

        def feed(k: int) -> None:
            while time.perf_counter() - t0 < seconds:
                enc(blocks[(done[k] // window + k) % len(blocks)])
                done[k] += window

        threads = [threading.Thread(target=feed, args=(k,)) for k in range(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        measured = sum(done) / wall
        # The encoder's host work in CPU time: on this machine it runs on the cores the CPU stages
        # use, so at R ~ P it takes from P what a GPU node's own encoder CPUs would give back.
        host_ms = 1000 * (time.process_time() - cpu0) / max(1, sum(done))
        return {"target": rate, "measured": measured, "error": measured / rate - 1.0,
                "host_cpu_ms_per_record": host_ms, "host_cores_at_R": host_ms * rate / 1000}

    # -- the whole workload ---------------------------------------------------------------
    def run(self) -> dict:
        from mmembed.testing.standin import NullEncoder, RateLimitedEncoder

        args = self.args
        dim = self._dim()
        null = (NullEncoder, {"dim": dim})
        sample, in_process_rate = self.preprocessed_sample(4 * args.batch_size if args.smoke else 8 * args.batch_size)
        if args.smoke:
            n_p = 16
        else:
            pilot = self.job(self.spec["pilot"], *null, "pilot")
            # Sized by the rate while shards stream: the whole-job rate of a short pilot is mostly
            # start-up, and N sized by it gives jobs whose difference is start-up noise.
            n_p = max(64, int(args.seconds * (pilot["streaming_rate"] or pilot["rate"])))
        pre = self.pair(n_p, *null, "null")
        if args.smoke:
            # A 16-record job is all start-up; its rate would make R absurdly slow. The smoke run
            # sets R from one in-process PreprocessStage call instead (no pipeline, no fixed cost).
            p_rate = in_process_rate
            self.log(f"P = {p_rate:.1f} rec/s (smoke: one in-process preprocess call)")
        else:
            # R is set from P, so P must not carry start-up noise: on 2 CPUs a job's start-up
            # varies by several seconds, as much as the marginal time of thousands of records.
            p_rate = pre["big"]["streaming_rate"] or pre["marginal_rate"] or pre["big"]["rate"]
            self.log(f"P = {p_rate:.1f} rec/s while shards stream (marginal: {pre['marginal_rate'] or 0:.1f})")
        result = {"P": p_rate, "P_marginal": pre["marginal_rate"], "preprocess_only": pre, "by_factor": {}}
        for factor in R_FACTORS:
            rate = factor * p_rate
            check = self.encoder_check(sample, rate, 0.3 if args.smoke else args.check_seconds)
            self.log(f"R = {factor} P = {rate:.1f} rec/s; stand-in alone: {check['measured']:.1f} "
                     f"({check['error']:+.1%}), host work {check['host_cpu_ms_per_record']:.2f} ms CPU/record "
                     f"= {check['host_cores_at_R']:.2f} cores at R")
            n = 16 if args.smoke else max(64, int(args.seconds * min(p_rate, rate)))
            e2e = self.pair(n, RateLimitedEncoder, {"rate": rate}, f"R={factor}P")
            e = e2e["marginal_rate"] or e2e["big"]["rate"]
            streaming = e2e["big"]["streaming_rate"]
            result["by_factor"][str(factor)] = {
                "R": rate,
                "encoder_check": check,
                "end_to_end": e2e,
                "E": e,
                "efficiency": e / min(p_rate, rate),
                "E_streaming": streaming,
                "efficiency_streaming": streaming / min(p_rate, rate) if streaming else None,
                "efficiency_whole_job": e2e["big"]["rate"] / min(p_rate, rate),
            }
        return result

    def _dim(self) -> int:
        from mmembed.models.loading import ModelSpec, load_model

        return load_model(ModelSpec(self.model_dir), weights=False).get_embedding_dimension()


# -- comparisons: two forms of the same corpus through the same CPU pool --------------------------
class Comparison(Bench):
    """Side A and side B, the same records in two forms, through the real pipeline with the null
    encoder (so at the CPU stages' rate), alternating A, B, A, B for --repeats rounds, every job
    with the same --num-preprocessors. The rate is rows written per second: while shards stream
    (as P above) and over the whole job."""

    sides: tuple[str, str] = ("A", "B")
    unit = "rows"

    def __init__(self, args, name, spec, model_dir, files, *, pool_size: int, extra: dict):
        super().__init__(args, name, spec, model_dir, files)
        self.pool_size, self.extra = pool_size, extra

    def setup(self) -> tuple[int, dict, dict]:
        """(rows per job, {side: (--input, extra options)}, notes for the report)."""
        raise NotImplementedError

    def in_process_rate(self, stage, records, rows: int, repeats: int = 2) -> float:
        """Rows per second of one PreprocessStage call in this process (no Ray, one core's worth):
        the best of `repeats` calls, after the stage has seen one of these records."""
        stage(records.slice(0, 1))
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            table = stage(records)
            dt = time.perf_counter() - t0
            assert table.num_rows == rows and table.column("error").null_count == rows, "preprocess errors"
            best = dt if best is None else min(best, dt)
        return rows / best

    def run(self) -> dict:
        import statistics

        from mmembed.testing.standin import NullEncoder

        n, inputs, notes = self.setup()
        null = (NullEncoder, {"dim": self._dim()})
        pool = ("--num-preprocessors", str(self.pool_size))
        runs: dict[str, list] = {side: [] for side in self.sides}
        for _ in range(1 if self.args.smoke else self.args.repeats):
            for side in self.sides:
                source, extra = inputs[side]
                runs[side].append(self.execute(source, n, *null, side, (*pool, *extra)))
        out = {"rows": n, "unit": self.unit, "sides": list(self.sides), "num_preprocessors": self.pool_size,
               **notes, "by_side": {}}
        for side in self.sides:
            streaming = [r["streaming_rate"] for r in runs[side]]
            out["by_side"][side] = {
                "runs": runs[side],
                "streaming": streaming,
                "whole_job": [r["rate"] for r in runs[side]],
                "median_streaming": statistics.median(streaming) if all(streaming) else None,
                "median_whole_job": statistics.median(r["rate"] for r in runs[side]),
                "preprocessors": sorted({r["resources"].get("num_preprocessors") for r in runs[side]}),
            }
        a, b = (out["by_side"][side] for side in self.sides)
        for key in ("streaming", "whole_job"):
            ma, mb = a[f"median_{key}"], b[f"median_{key}"]
            out[f"ratio_{key}"] = mb / ma if ma and mb else None
            out[f"pair_ratios_{key}"] = [y / x if x and y else None for x, y in zip(a[key], b[key])]
        if a["preprocessors"] != b["preprocessors"]:
            raise SystemExit(f"feed.py: {self.name}: the two sides ran different pools: {a['preprocessors']} "
                             f"vs {b['preprocessors']}")
        self.log(f"{self.sides[1]} / {self.sides[0]}: {_fmt(out['ratio_streaming'], '.3f')} while shards stream "
                 f"(pairs: {', '.join(_fmt(r, '.3f') for r in out['pair_ratios_streaming'])}), "
                 f"{_fmt(out['ratio_whole_job'], '.3f')} whole job")
        return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


class PdfPages(Comparison):
    """The screenshots of qwen3vl_shots (A: one PNG a record) against PDFs made of them (B: each
    page one screenshot at 72 dpi, so a page is the screenshot's size), Qwen3-VL's processor: P in
    screenshots/s against P in pages/s (rendering at max_pixels with pypdfium2, then the processor)."""

    sides = ("screenshots", "pdf_pages")
    unit = "images or pages"

    def setup(self):
        import pyarrow.parquet as pq

        from mmembed.models.loading import ModelSpec
        from mmembed.stages.preprocess import PreprocessStage
        from mmembed.stages.read import normalize_manifest_table

        pages, pdfs = self.spec["pages_per_pdf"], self.extra["pdfs"]
        # One process: sizes the jobs and gives the per-core cost without Ray around it.
        k = 2 * pages if self.args.smoke else 4 * pages
        opts = self.spec["options"]
        transport = opts[opts.index("--transport-dtype") + 1] if "--transport-dtype" in opts else None
        stage = PreprocessStage(ModelSpec(self.model_dir), transport_dtype=transport)
        shots_records = normalize_manifest_table(
            pq.read_table(write_manifest(self.work / f"manifest-{k}.parquet", self.files, k)), "")
        pdf_records = normalize_manifest_table(pq.read_table(
            write_manifest(self.work / f"pdf-manifest-{k // pages}.parquet", pdfs, k // pages, "pdf")), "")
        shots_rate = self.in_process_rate(stage, shots_records, k)
        pages_rate = self.in_process_rate(stage, pdf_records, k)
        self.log(f"one process: {shots_rate:.1f} screenshots/s, {pages_rate:.1f} PDF pages/s "
                 f"(ratio {pages_rate / shots_rate:.3f}; {len(pdfs)} PDFs of {pages} pages)")
        n = 2 * pages if self.args.smoke else max(8 * pages, int(self.args.seconds * shots_rate))
        n = -(-n // pages) * pages
        docs = write_manifest(self.work / f"pdf-manifest-{n // pages}.parquet", pdfs, n // pages, "pdf")
        shots = write_manifest(self.work / f"manifest-{n}.parquet", self.files, n)
        notes = {"pages_per_pdf": pages, "documents_per_job": n // pages, "distinct_pdfs": len(pdfs),
                 "one_process": {"screenshots_per_s": shots_rate, "pages_per_s": pages_rate,
                                 "ratio": pages_rate / shots_rate}}
        return n, {"screenshots": (str(shots), ()), "pdf_pages": (str(docs), ())}, notes


class WdsS3(Comparison):
    """The CLIP photos on a moto S3 server, once one object per image behind a Parquet manifest of
    s3:// URIs (A), once packed into WebDataset tar shards of --shard-records records, jpg + txt
    members (B); records/s of each, `--modalities image` on both (the shards' captions stay out)."""

    sides = ("objects", "wds_shards")
    unit = "records"

    def setup(self):
        import pyarrow.parquet as pq

        from mmembed.models.loading import ModelSpec
        from mmembed.stages.preprocess import PreprocessStage
        from mmembed.stages.read import normalize_manifest_table

        opts = self.extra["s3"]
        per_shard = 8 if self.args.smoke else self.args.shard_records
        if self.args.smoke:
            n = 2 * per_shard
        else:
            k = 64
            records = normalize_manifest_table(
                pq.read_table(write_manifest(self.work / f"manifest-{k}.parquet", self.files, k)), "")
            rate = self.in_process_rate(PreprocessStage(ModelSpec(self.model_dir)), records, k)
            self.log(f"one process, local files: {rate:.1f} photos/s (sizes the jobs)")
            n = max(4 * per_shard, int(self.args.seconds * rate))
        n = -(-n // per_shard) * per_shard
        shards = n // per_shard
        from mmembed.testing.moto import s3_filesystem
        from mmembed.testing.shards import tar_shard

        fs, bucket = s3_filesystem(opts), "feed-bench"
        s3_bucket(opts, bucket)
        photos = [Path(p).read_bytes() for p in self.files]
        t0 = time.perf_counter()
        # A: one object per distinct image; the manifest cycles over them as every workload here does.
        objects = [f"s3://{bucket}/objects/p{i:06d}.jpg" for i in range(min(n, len(photos)))]
        fs.pipe({u[len("s3://"):]: photos[i] for i, u in enumerate(objects)})
        manifest = write_manifest(self.work / f"objects-manifest-{n}.parquet", objects, n)
        fs.put_file(str(manifest), f"{bucket}/objects-manifest-{n}.parquet")
        # B: the same n images in order, per_shard records to a tar, as img2dataset writes them.
        for s_ in range(shards):
            recs = [(f"{i:09d}", {"jpg": photos[i % len(photos)], "txt": f"photo {i}".encode()})
                    for i in range(s_ * per_shard, (s_ + 1) * per_shard)]
            fs.pipe_file(f"{bucket}/shards-{n}/{s_:05d}.tar", tar_shard(recs))
        upload = time.perf_counter() - t0
        self.log(f"uploaded {len(objects)} objects + manifest and {shards} shards of {per_shard} records "
                 f"to moto S3 in {upload:.1f} s")
        extra = ("--storage-options", json.dumps(opts), "--modalities", "image")
        inputs = {"objects": (f"s3://{bucket}/objects-manifest-{n}.parquet", extra),
                  "wds_shards": (f"s3://{bucket}/shards-{n}/{{{0:05d}..{shards - 1:05d}}}.tar", extra)}
        notes = {"records_per_shard": per_shard, "shards": shards, "distinct_objects": len(objects),
                 "upload_s": upload, "requests": self.count_requests(opts, objects, f"s3://{bucket}/shards-{n}/00000.tar")}
        return n, inputs, notes

    def count_requests(self, opts: dict, objects: list[str], shard: str, sample: int = 32) -> dict:
        """S3 requests by method, per object fetched (side A: the preprocess stage's fetcher on `sample`
        objects) and per shard read (side B: the WebDataset reader on one shard), through a logging
        proxy in front of moto, outside the timed jobs."""
        from collections import Counter

        from mmembed.inputs.webdataset import read_shard
        from mmembed.storage.fetch import Fetcher
        from mmembed.testing.proxy import FaultyProxy

        proxy = FaultyProxy(opts["endpoint_url"])
        via = {**opts, "endpoint_url": proxy.start()}
        try:
            fetcher = Fetcher(via)
            for uri in objects[:sample]:
                fetcher.fetch(uri)
            by_object = Counter(method for method, _, _ in proxy.log)
            del proxy.log[:]
            shard_records = sum(t.num_rows for t in read_shard(shard, "00000", via))
            by_shard = Counter(method for method, _, _ in proxy.log)
        finally:
            proxy.stop()
        out = {"per_object": {m: c / min(sample, len(objects)) for m, c in by_object.items()},
               "per_shard": dict(by_shard), "records_per_shard": shard_records}
        self.log(f"S3 requests: {out['per_object']} per object fetched; {out['per_shard']} per shard of "
                 f"{shard_records} records")
        return out


COMPARISONS = {
    # name: class, model (mmembed/testing/shapes.py build_model), corpus kind, distinct files, pipeline options
    "pdf_pages": {"class": PdfPages, "model": "qwen3vl", "corpus": "shots", "files": 256, "pages_per_pdf": 8,
                  "options": WORKLOADS["qwen3vl_shots"]["options"]},
    "wds_s3": {"class": WdsS3, "model": "clip_b32", "corpus": "photos", "files": 1024, "options": []},
}


def comparison_table(comparisons: dict) -> str:
    lines = [f"{'comparison':<11} {'side':<12} {'rows':>6} {'pool':>4} {'rows/s while streaming':>30} "
             f"{'median':>7} {'whole-job':>9}"]
    for name, c in comparisons.items():
        for side in c["sides"]:
            s = c["by_side"][side]
            runs = ", ".join(_fmt(x, ".1f") for x in s["streaming"])
            lines.append(f"{name:<11} {side:<12} {c['rows']:>6} {','.join(map(str, s['preprocessors'])):>4} "
                         f"{runs:>30} {_fmt(s['median_streaming'], '.1f'):>7} {s['median_whole_job']:>9.1f}")
        b, a = c["sides"][1], c["sides"][0]
        pairs = ", ".join(_fmt(r, ".3f") for r in c["pair_ratios_streaming"])
        line = (f"{name:<11} ratio {b} / {a}: {_fmt(c['ratio_streaming'], '.3f')} while streaming (pairs: {pairs}), "
                f"{_fmt(c['ratio_whole_job'], '.3f')} whole job")
        if "one_process" in c:
            o = c["one_process"]
            line += (f"; one process: {o['pages_per_s']:.1f} pages/s vs {o['screenshots_per_s']:.1f} "
                     f"screenshots/s = {o['ratio']:.3f}")
        lines.append(line)
    return "\n".join(lines)


def pool_size(args, cpus: float, model_dir: str) -> int:
    """--num-preprocessors for both sides of a comparison: the flag, else what mmembed's planner
    gives this cluster for a job of unknown size."""
    if args.num_preprocessors:
        return args.num_preprocessors
    from mmembed import cli
    from mmembed.executors.cluster import plan_resources

    cfg = cli.parse("embed", ["--input", "-", "--output", "-", "--model", model_dir, "--device", "cpu",
                              "--calls-per-encoder", str(args.calls_per_encoder), *args.job_options])
    return plan_resources(cpus, 0, cfg)["num_preprocessors"]


def table(results: dict) -> str:
    lines = [
        f"{'workload':<14} {'R/P':>4} {'P rec/s':>8} {'R rec/s':>8} {'R alone':>8} {'E rec/s':>8} "
        f"{'E/min(P,R)':>10} {'streaming':>9} {'whole-job':>9}",
    ]
    for name, r in results.items():
        for factor, f in r["by_factor"].items():
            lines.append(
                f"{name:<14} {float(factor):>4.1f} {r['P']:>8.1f} {f['R']:>8.1f} {f['encoder_check']['measured']:>8.1f} "
                f"{f['E']:>8.1f} {f['efficiency']:>10.2f} {f.get('efficiency_streaming') or float('nan'):>9.2f} "
                f"{f['efficiency_whole_job']:>9.2f}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {', '.join(WORKLOADS)} (the default) and the comparisons "
                    f"{', '.join(COMPARISONS)}")
    ap.add_argument("--seconds", type=float, default=60.0, help="target wall time of each larger job (default 60)")
    ap.add_argument("--check-seconds", type=float, default=5.0, help="how long the stand-in is timed alone (default 5)")
    ap.add_argument("--batch-size", type=int, default=32, help="encoder batch (default 32, mmembed's default)")
    ap.add_argument("--job-option", dest="job_options", action="append", default=[],
                    help="extra `mmembed embed` option for every job, repeatable (e.g. --job-option=--encode-window=128)")
    ap.add_argument("--workdir", default=None, help="where inputs, models and outputs go (default: a temp dir)")
    ap.add_argument("--calls-per-encoder", type=int, default=2,
                    help="the jobs' --calls-per-encoder (default 2, mmembed's default on a GPU, which the stand-in "
                    "models; 1 shows what the overlap is worth)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="comparisons: rounds of A, B jobs (default 2: A, B, A, B; medians over the rounds)")
    ap.add_argument("--num-preprocessors", type=int, default=None,
                    help="comparisons: the preprocess pool of every job, both sides alike (default: what mmembed's "
                    "planner gives this cluster)")
    ap.add_argument("--shard-records", type=int, default=256, help="wds_s3: records per tar shard (default 256)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every measurement runs")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="mmembed-feed-")
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(chosen) - set(WORKLOADS) - set(COMPARISONS))
    if unknown:
        print(f"feed.py: unknown workloads {unknown}; choose from {list(WORKLOADS) + list(COMPARISONS)}",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    import contextlib

    import ray

    from mmembed.executors.cluster import init_ray

    results, comparisons = {}, {}
    with contextlib.ExitStack() as stack:
        # The S3 server starts before Ray, so Ray's workers see its (dummy) credentials too.
        s3 = stack.enter_context(moto_s3()) if "wds_s3" in chosen else None
        init_ray(None)
        cpus = ray.cluster_resources().get("CPU")
        with mp.get_context("spawn").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
            for name in chosen:
                spec = WORKLOADS.get(name) or COMPARISONS[name]
                files = corpus(args.workdir, spec["corpus"], 8 if args.smoke else spec["files"], pool)
                model_dir = build_model(args.workdir, spec["model"], True, "float32", "cpu")
                if name in WORKLOADS:
                    results[name] = Bench(args, name, spec, model_dir, files).run()
                    continue
                extra = {"s3": s3}
                if "pages_per_pdf" in spec:
                    extra["pdfs"] = pdf_corpus(args.workdir, files, spec["pages_per_pdf"], pool)
                comparisons[name] = spec["class"](args, name, spec, model_dir, files, extra=extra,
                                                  pool_size=pool_size(args, cpus, model_dir)).run()
    print(f"\nbenchmarks/feed.py  ({cpus:g} CPUs, stand-in encoders, marginal rates; {'smoke' if args.smoke else 'full'})")
    if results:
        print(table(results))
    if comparisons:
        print(("\n" if results else "") + comparison_table(comparisons))
    if args.json:
        report = {"cpus": cpus, "smoke": args.smoke, "results": results}
        if comparisons:
            report["comparisons"] = comparisons
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

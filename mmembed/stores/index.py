"""Approximate nearest-neighbour indexes over an embedding store, built and read with FAISS.

    <output>/index-<token>.faiss    the FAISS index (row r = the r-th embedding added)
    <output>/ids-<token>.parquet    `id` (string), row r -> the document id of index row r
    <output>/_manifest.json         written last: source store and its shard list, model, dim,
                                    metric, index parameters, counts, library versions

FAISS rather than LanceDB: FAISS indexes the numpy matrices we already read from our Parquet
shards and writes one self-contained file, while LanceDB only indexes its own Lance tables, so
the whole corpus would first be copied into a second format.

The files carry a per-build token and only `_manifest.json` (status "complete", written last,
atomically) names them: a half-written or interrupted build is never read as an index, and a
rebuild into the same output never mixes its files with the previous build's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmembed.errors import UsageError
from mmembed.outputs.manifest import MANIFEST_NAME, read_json
from mmembed.storage.fs import filesystem, join_uri, with_retries

INDEX_JOB = "index"
KINDS = ("flat", "ivf-flat", "ivf-sq8", "hnsw", "ivf-pq")
IVF_KINDS = ("ivf-flat", "ivf-sq8", "ivf-pq")
# Similarity (ST's name, from the embed manifest) -> how the index compares vectors.
METRICS = {"cosine": "inner_product", "dot": "inner_product", "euclidean": "l2"}
# Below this many vectors an exact scan is instant; an approximate index only costs recall.
FLAT_BELOW = 10_000
INSTALL_HINT = 'pip install "mmembed[index]"  (or: pip install faiss-cpu)'


def require_faiss():
    """The faiss module, or a UsageError (exit 2) that says how to install it."""
    import logging

    # Its loader logs each SIMD build it tries at INFO, which the jobs' logging would print.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        raise UsageError(f"approximate search needs FAISS, which is not installed: {INSTALL_HINT}") from None
    return faiss


# --------------------------------------------------------------------------------------------
# The source: an embed output, a reembed snapshot, or a store's CURRENT
# --------------------------------------------------------------------------------------------
@dataclass
class EmbeddingSource:
    """The committed embeddings at a URI, read only through the shard list of its manifest."""

    uri: str  # as given
    root: str  # the directory whose _manifest.json lists the shards
    manifest: dict
    storage_options: dict = field(default_factory=dict)

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None) -> "EmbeddingSource":
        from mmembed.stores.store import STORE_MARKER, open_current

        opts = storage_options or {}
        root = uri
        m = read_json(join_uri(uri, MANIFEST_NAME), opts)
        if m is None and read_json(join_uri(uri, STORE_MARKER), opts) is not None:
            root = open_current(uri, opts)  # a store root: read what CURRENT points at
            m = read_json(join_uri(root, MANIFEST_NAME), opts)
        if not m or m.get("job") not in ("embed", "reembed") or m.get("status") != "complete":
            raise UsageError(
                f"--embeddings {uri} is not a finished `mmembed embed` output, reembed snapshot or embedding store "
                "(no complete _manifest.json); embed the corpus first."
            )
        if not m.get("files") or not m["counts"].get("written"):
            raise UsageError(f"--embeddings {uri} holds no embeddings.")
        q = m["model"].get("quantization") or {}
        if q and not q.get("float_column"):
            raise UsageError(
                f"--embeddings {uri} stores only {q.get('precision')} vectors, and the index is built from float "
                f"vectors. Embed the corpus with `--precision {q.get('precision')} --keep-float` (the index then "
                "reads the float column) or without --precision, or search it exactly with `mmembed search "
                "--corpus-embeddings`."
            )
        return cls(uri, root, m, opts)

    @property
    def column(self) -> str:
        """The float vectors: `embedding`, or the --keep-float column of a quantised corpus."""
        return (self.model.get("quantization") or {}).get("float_column") or "embedding"

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def multi_vector(self) -> bool:
        return bool(self.model.get("multi_vector"))

    @property
    def dim(self) -> int:
        return int(self.model["dim"])

    @property
    def similarity(self) -> str:
        return self.model.get("similarity_fn_name") or "cosine"  # ST's default when a model names none

    @property
    def files(self) -> list[dict]:
        return self.manifest["files"]

    @property
    def count(self) -> int:
        return sum(int(f["rows"]) for f in self.files)

    def fingerprint(self) -> str:
        """A digest of the shard list: the same store contents give the same fingerprint."""
        listed = [{"name": f["name"], "rows": f["rows"]} for f in self.files]
        payload = {"root": self.root, "finished_at": self.manifest.get("finished_at"), "files": listed}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def shard(self, entry: dict) -> tuple[pa.Array, np.ndarray]:
        """(ids, float32 [rows, dim]) of one shard: the unit of streaming."""
        from mmembed.schema import embedding_matrix

        fs, path = filesystem(join_uri(self.root, entry["name"]), self.storage_options)

        def read():
            with fs.open(path, "rb") as f:
                return pq.read_table(f, columns=["id", self.column])

        t = with_retries(read)
        return t.column("id").combine_chunks().cast(pa.string()), embedding_matrix(t.column(self.column), self.dim)

    def shards(self):
        for entry in self.files:
            yield self.shard(entry)

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """`size` rows drawn uniformly from the whole store, reading only the shards they fall in."""
        n = self.count
        if size >= n:
            return np.concatenate([m for _, m in self.shards()])
        picked = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
        out, start = [], 0
        for entry in self.files:
            stop = start + int(entry["rows"])
            lo, hi = np.searchsorted(picked, [start, stop])
            if hi > lo:
                out.append(self.shard(entry)[1][picked[lo:hi] - start])
            start = stop
        return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
@dataclass
class IndexParams:
    """What the index is; unset values are chosen from the corpus size by `resolve`."""

    kind: str | None = None
    nlist: int | None = None  # IVF: inverted lists (k-means centroids)
    nprobe: int | None = None  # IVF: lists scanned per query (the default searches use)
    m: int | None = None  # HNSW: links per node; IVF-PQ: sub-quantizers (must divide dim)
    nbits: int | None = None  # IVF-PQ: bits per sub-quantizer code
    ef_construction: int | None = None  # HNSW
    ef_search: int | None = None  # HNSW: candidate list per query (the default searches use)
    train_size: int | None = None  # IVF: vectors sampled to train the quantizer

    # Which options each kind takes; anything else given is refused rather than silently ignored.
    OPTIONS = {
        "flat": (),
        "ivf-flat": ("nlist", "nprobe", "train_size"),
        "ivf-sq8": ("nlist", "nprobe", "train_size"),
        "ivf-pq": ("nlist", "nprobe", "m", "nbits", "train_size"),
        "hnsw": ("m", "ef_construction", "ef_search"),
    }

    def resolve(self, n: int, dim: int) -> "IndexParams":
        """Defaults by corpus size (measured in benchmarks/RESULTS.md, "Approximate search at 1M")."""
        p = IndexParams(**asdict(self))
        if p.kind is None:
            ivf_given = p.nlist or p.nprobe or p.train_size
            p.kind = "ivf-flat" if ivf_given or n >= FLAT_BELOW else "flat"
        stray = [k for k in ("nlist", "nprobe", "m", "nbits", "ef_construction", "ef_search", "train_size")
                 if getattr(p, k) is not None and k not in self.OPTIONS[p.kind]]
        if stray:
            flags = ", ".join("--" + k.replace("_", "-") for k in stray)
            raise UsageError(f"{flags} do(es) not apply to --kind {p.kind} (it takes: "
                             f"{', '.join('--' + k.replace('_', '-') for k in self.OPTIONS[p.kind]) or 'nothing'}).")
        if p.kind in IVF_KINDS:
            # ~sqrt(n) lists, a power of two, with >= 39 training vectors each (FAISS's own minimum).
            p.nlist = p.nlist or max(1, min(2 ** round(math.log2(math.sqrt(n))), n // 39))
            if p.nlist > n:
                raise UsageError(f"--nlist {p.nlist} exceeds the {n:,} vectors of the corpus.")
            p.nprobe = min(p.nprobe or max(1, p.nlist // 16), p.nlist)
            p.train_size = min(n, p.train_size or max(64 * p.nlist, 256 * 39 if p.kind == "ivf-pq" else 0))
        if p.kind == "ivf-pq":
            p.nbits = p.nbits or 8
            p.m = p.m or next(d for d in range(max(1, dim // 8), 0, -1) if dim % d == 0)
            if dim % p.m:
                raise UsageError(f"--m {p.m} must divide the embedding dim {dim} for ivf-pq.")
        if p.kind == "hnsw":
            p.m = p.m or 32
            p.ef_construction = p.ef_construction or 80
            p.ef_search = p.ef_search or 128
        return p

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: getattr(self, k) for k in self.OPTIONS[self.kind]}}


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
class IndexBuilder:
    """Trains a FAISS index on a sample of the store, then adds it shard by shard."""

    def __init__(self, source: EmbeddingSource, params: IndexParams):
        self.faiss = require_faiss()
        self.source = source
        self.metric = METRICS[source.similarity]
        self.params = params.resolve(source.count, source.dim)
        # Unnormalised vectors under cosine: normalise on the way in (and queries at search time),
        # so inner product is the cosine.
        self.normalize = source.similarity == "cosine" and not source.model.get("normalize")

    def _empty(self):
        faiss, p, d = self.faiss, self.params, self.source.dim
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "inner_product" else faiss.METRIC_L2
        if p.kind == "flat":
            return faiss.IndexFlat(d, metric)
        if p.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p.m, metric)
            index.hnsw.efConstruction = p.ef_construction
            return index
        quantizer = faiss.IndexFlat(d, metric)
        if p.kind == "ivf-flat":
            index = faiss.IndexIVFFlat(quantizer, d, p.nlist, metric)
        elif p.kind == "ivf-sq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, p.nlist, faiss.ScalarQuantizer.QT_8bit, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.m, p.nbits, metric)
        return index

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.normalize:
            self.faiss.normalize_L2(x)
        return x

    def build(self):
        """(the FAISS index, row -> id as one Arrow string array)."""
        index = self._empty()
        if not index.is_trained:
            index.train(self._prepare(self.source.sample(self.params.train_size)))
        ids = []
        for shard_ids, vectors in self.source.shards():
            index.add(self._prepare(vectors))
            ids.append(shard_ids)
        return index, pa.concat_arrays(ids)


class IndexOutput:
    """The committed files of an index at `uri`: written under unique names, named by the manifest."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = storage_options or {}
        self.fs, self.path = filesystem(uri, self.storage_options)

    def existing(self) -> dict | None:
        return read_json(join_uri(self.uri, MANIFEST_NAME), self.storage_options)

    def commit(self, index, ids: pa.Array | pa.Table, manifest: dict, extra: dict | None = None) -> dict:
        """Upload the index and id files (and `extra`: {key: local .npy file}, a multi-vector index's vectors),
        then write the manifest that makes them the index."""
        from mmembed.outputs.manifest import write_json

        faiss = require_faiss()
        token = uuid.uuid4().hex[:8]
        names = {"index": f"index-{token}.faiss", "ids": f"ids-{token}.parquet",
                 **{key: f"{key}-{token}.npy" for key in extra or {}}}
        previous = self.existing()
        previous = previous if (previous or {}).get("job") == INDEX_JOB else None
        self.fs.makedirs(self.path, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mmembed-index-") as tmp:
            local = {k: os.path.join(tmp, v) for k, v in names.items()}
            local.update(extra or {})
            faiss.write_index(index, local["index"])
            # Row -> id; a multi-vector index's table also holds each document's first token row.
            pq.write_table(ids if isinstance(ids, pa.Table) else pa.table({"id": ids}), local["ids"],
                           compression="zstd")
            files = {}
            for key, name in names.items():
                files[key] = {"name": name, "bytes": os.path.getsize(local[key])}
                target = f"{self.path.rstrip('/')}/{name}"
                with_retries(lambda src=local[key], dst=target: self.fs.put_file(src, dst))
        manifest = {**manifest, "status": "complete", "files": files}
        write_json(join_uri(self.uri, MANIFEST_NAME), manifest, self.storage_options)
        # Once the new manifest is in place, the previous build's files (and those of a build that
        # died before its manifest) are unreachable: remove them. The run lock keeps builders apart.
        keep = set(names.values())
        root = self.path.rstrip("/")
        stale = {e["name"] for e in ((previous or {}).get("files") or {}).values()}
        self.fs.invalidate_cache(root)
        for pattern in ("index-*.faiss", "ids-*.parquet", "vectors-*.npy"):
            stale.update(p.rsplit("/", 1)[-1] for p in self.fs.glob(f"{root}/{pattern}"))
        for name in sorted(stale - keep):
            try:
                with_retries(lambda n=name: self.fs.rm(f"{root}/{n}"))
            except FileNotFoundError:
                pass
        return manifest


# --------------------------------------------------------------------------------------------
# Searching
# --------------------------------------------------------------------------------------------
def read_index_manifest(uri: str, storage_options: dict | None = None) -> dict:
    m = read_json(join_uri(uri, MANIFEST_NAME), storage_options or {})
    if not m or m.get("job") != INDEX_JOB or m.get("status") != "complete":
        raise UsageError(
            f"--index {uri} is not a finished `mmembed index` output (no complete _manifest.json); build it with "
            "`mmembed index --embeddings CORPUS_EMBEDDINGS --output URI`."
        )
    return m


def fetch_index(uri: str, storage_options: dict | None = None):
    """(manifest, the FAISS index in memory, its ids table, a function that copies one more of its files to
    local disk and returns the local path) of the committed index at uri."""
    faiss = require_faiss()
    manifest = read_index_manifest(uri, storage_options)
    fs, path = filesystem(uri, storage_options or {})
    root = path.rstrip("/")
    files = manifest["files"]

    def local_copy(key: str, directory: str) -> str:
        local = os.path.join(directory, files[key]["name"])
        with_retries(lambda: fs.get_file(f"{root}/{files[key]['name']}", local))
        return local

    with tempfile.TemporaryDirectory(prefix="mmembed-index-") as tmp:
        index = faiss.read_index(local_copy("index", tmp))
    with fs.open(f"{root}/{files['ids']['name']}", "rb") as f:
        table = pq.read_table(f)
    return manifest, index, table, local_copy


class AnnIndex:
    """A FAISS index with its row -> doc id map: top-k (scores, doc ids) for a matrix of queries."""

    def __init__(self, index, ids: pa.Array, params: dict, metric: str, normalize: bool):
        self.faiss = require_faiss()
        self.index, self.ids, self.params = index, ids, params
        self.metric, self.normalize = metric, normalize
        if len(self.ids) != self.index.ntotal:
            raise UsageError(f"{len(self.ids)} ids for {self.index.ntotal} index vectors; rebuild the index.")
        self.tune()

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None, *, nprobe: int | None = None,
             ef_search: int | None = None) -> "AnnIndex":
        """The committed index at uri, copied to local disk once and read into memory."""
        manifest, index, table, _ = fetch_index(uri, storage_options)
        ann = cls(index, table.column("id").combine_chunks(), manifest["index"], manifest["metric"],
                  manifest["normalize_inputs"])
        ann.tune(nprobe=nprobe, ef_search=ef_search)
        return ann

    def tune(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Search-time settings: the given ones, else those the index was built with."""
        if self.params["kind"] in IVF_KINDS:
            self.index.nprobe = min(nprobe or self.params["nprobe"], self.params["nlist"])
        elif self.params["kind"] == "hnsw":
            self.index.hnsw.efSearch = ef_search or self.params["ef_search"]

    def _settings(self) -> tuple:
        if self.params["kind"] in IVF_KINDS:
            return ("nprobe", self.index.nprobe)
        if self.params["kind"] == "hnsw":
            return ("efSearch", self.index.hnsw.efSearch)
        return (None, None)

    def _widen(self) -> bool:
        """Search more of the index (twice the lists or candidates); False once it searches everything."""
        if self.params["kind"] in IVF_KINDS and self.index.nprobe < self.params["nlist"]:
            self.index.nprobe = min(2 * self.index.nprobe, self.params["nlist"])
            return True
        if self.params["kind"] == "hnsw" and self.index.hnsw.efSearch < self.index.ntotal:
            self.index.hnsw.efSearch = 2 * self.index.hnsw.efSearch
            return True
        return False

    def _search_filled(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """index.search, widened for the queries whose probed lists held fewer than k vectors, so
        that every query gets k hits (as exact search gives) wherever the index can find them."""
        scores, rows = self.index.search(q, k)
        short = np.flatnonzero((rows < 0).any(axis=1))
        if not short.size:
            return scores, rows
        name, value = self._settings()
        try:
            while short.size and self._widen():
                s, r = self.index.search(q[short], k)
                scores[short], rows[short] = s, r
                short = short[(r < 0).any(axis=1)]
        finally:
            if name == "nprobe":
                self.index.nprobe = value
            elif name == "efSearch":
                self.index.hnsw.efSearch = value
        return scores, rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """([nq, k'] scores as ST's similarity gives them, [nq, k'] doc ids), k' = min(k, corpus).

        A slot even the widest search leaves empty has score -inf and doc id None."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.normalize:
            q = q.copy()
            self.faiss.normalize_L2(q)
        k = min(k, self.index.ntotal)
        scores, rows = self._search_filled(q, k)
        if self.metric == "l2":
            scores = -np.sqrt(np.maximum(scores, 0))  # ST's euclidean similarity: minus the distance
        found = rows >= 0
        scores[~found] = -np.inf
        doc_ids = np.full(rows.shape, None, dtype=object)
        doc_ids[found] = np.asarray(self.ids.take(pa.array(rows[found])).to_pylist(), dtype=object)
        return scores, doc_ids


def index_as_corpus(index_uri: str, corpus_uri: str | None, storage_options: dict | None = None, *,
                    nprobe: int | None = None, ef_search: int | None = None) -> dict:
    """An index's manifest in the shape search plans with (model, counts, shards) for `search --index`."""
    require_faiss()
    m = read_index_manifest(index_uri, storage_options)
    kind = m["index"]["kind"]
    if nprobe is not None and kind not in IVF_KINDS:
        raise UsageError(f"--nprobe applies to IVF indexes; --index {index_uri} is {kind}.")
    if ef_search is not None and kind != "hnsw":
        raise UsageError(f"--ef-search applies to hnsw indexes; --index {index_uri} is {kind}.")
    src = m["source"]
    if corpus_uri:
        given = EmbeddingSource.open(corpus_uri, storage_options)
        if given.fingerprint() != src["fingerprint"]:
            raise UsageError(
                f"--index {index_uri} was built from {src['root']} ({src['finished_at']}), not from the "
                f"--corpus-embeddings {corpus_uri} given; drop --corpus-embeddings or rebuild the index."
            )
    return {
        "model": {**m["model"], "similarity_fn_name": m["similarity_fn_name"],
                  **({"multi_vector": m["multi_vector"]} if m.get("multi_vector") else {})},
        "counts": {"written": m["counts"]["written"]},
        "uris": [join_uri(src["root"], f["name"]) for f in src["files"]],
        "source_uri": src["root"],
        "index": m["index"],
    }

"""A small retrieval set with relevance judgements, written in code (no download): a corpus of about 200
texts on 30 subjects in 6 topics, one query per subject, and BEIR-layout files (corpus, queries.jsonl,
qrels/test.tsv). Some queries have several relevant documents, others one relevant among judged
non-relevant ones, so binary relevance (score > 0) is exercised. Tests and benchmarks/evaluate.py use it."""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = {
    "astronomy": ["Mars", "Jupiter", "Saturn", "the Moon", "Venus"],
    "cooking": ["sourdough bread", "risotto", "ramen noodles", "pancakes", "guacamole"],
    "sports": ["tennis", "basketball", "marathon running", "swimming", "chess"],
    "gardening": ["tomato plants", "roses", "orchids", "basil", "apple trees"],
    "computing": ["Python programming", "SQL databases", "graphics cards", "web browsers", "compilers"],
    "travel": ["Japan", "Iceland", "Peru", "Kenya", "Norway"],
}
TEMPLATES = [
    "{e} is a well-known subject in {t}.",
    "Many people ask how to get started with {e}.",
    "A short history of {e} and why it matters in {t}.",
    "Common mistakes beginners make with {e}, and how to avoid them.",
    "The best tools and resources for {e}.",
    "An expert explains the science behind {e}.",
    "Photos and stories about {e} from around the world.",
]
BEGINNER = (1, 3)  # the templates a beginner's question is about


def judged_set() -> tuple[dict[str, str], dict[str, str], list[tuple[str, str, int]]]:
    """(corpus id -> text, query id -> text, qrels rows (query id, corpus id, score))."""
    corpus, queries, qrels = {}, {}, []
    n = 0
    for t, subjects in TOPICS.items():
        for e in subjects:
            qid = f"q{len(queries):02d}"
            queries[qid] = f"what should a beginner know about {e}?"
            several = len(queries) % 2 == 0
            for i, template in enumerate(TEMPLATES):
                did = f"d{n:03d}"
                corpus[did] = template.format(e=e, t=t)
                n += 1
                if several:  # every document on the subject is relevant
                    qrels.append((qid, did, 2 if i in BEGINNER else 1))
                elif i in BEGINNER or i == 0:  # one relevant; two judged and not relevant
                    qrels.append((qid, did, 1 if i == 3 else 0))
    return corpus, queries, qrels


def write_beir(root: str | Path) -> dict[str, str]:
    """The set in BEIR's layout plus a Parquet corpus manifest for `mmembed embed`/`reembed`; the paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = judged_set()
    pq.write_table(pa.table({"id": list(corpus), "text": list(corpus.values())}), root / "corpus.parquet")
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in corpus.items())
    with open(root / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items())
    with open(root / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    return {"corpus": str(root / "corpus.parquet"), "queries": str(root / "queries.jsonl"),
            "qrels": str(root / "qrels" / "test.tsv")}

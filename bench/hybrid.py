"""Recall@10 and queries/s of dense, BM25 and hybrid retrieval through the shard actors.

    python bench/hybrid.py [--workdir work-hybrid] [--max-bytes 1500000] [--queries 400] [--k 10]
        [--rrf-k 60] [--weight 0.5] [--depth 100] [--reps 3] [--out res.json]

1. Builds (or reuses) a workdir from the stdlib source (`ratray.build`: chunk store, MiniLM
   embeddings cached in the workdir, a 2-shard Flat index, the BM25 shards beside it).
2. A query set with known answers, from the database chunks themselves: a chunk holding a rare
   token (a whole word of its text with a '_' or a digit in it, or of >= 10 characters, found in at
   most 2 database chunks) gives one query, a fragment of it: 8 consecutive words of the chunk
   around that token (never the whole chunk: chunks of fewer than 20 words are not used).
   Three kinds, a third each (in turn):
     fragment    the 8 words as they stand in the chunk,
     paraphrase  the same words with identifiers spelt out (`parse_header` -> "parse header",
                 `HTTPServer` -> "http server", `0x7f` -> "0 x 7 f"), punctuation dropped: a
                 rare identifier is no longer in the query, only its parts (a rare plain word,
                 e.g. "deserializations", stays),
     inflected   the paraphrase with every word of >= 5 letters inflected (`inflect`:
                 actions -> action, parse -> parsing, header -> headers, parsed -> pars): the
                 vocabulary mismatch an untrained user's words have; BM25 here does no stemming.
   The answers of a query: every database chunk holding its rare token (1 or 2).
3. recall@k of dense (MiniLM query vector -> `ShardedIndex.search`), BM25
   (`ShardedIndex.keyword_search`) and hybrid (`ShardedIndex.hybrid_search`, index.hybrid = rrf
   and weighted), each with a 95% bootstrap interval over documents (the queries of one document
   are resampled together; ratray/eval/stats.py), and the paired difference hybrid - best other.
   A fusion grid (rrf_k, weight) re-fuses the same retrieved lists in-process (keyword.fuse).
4. queries/s of each through the actors: the whole query set as one batch, best and median of
   `--reps` (query embedding not included; it is printed on its own).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ratray.config import BuildConfig, IndexConfig, load_config  # noqa: E402
from ratray.eval.stats import ratio_delta_interval, ratio_interval  # noqa: E402
from ratray.index.keyword import fuse, identifier_parts, load_keyword, tokenize  # noqa: E402

WINDOW, MIN_WORDS = 8, 20


def rare_token(text: str, df: dict) -> str | None:
    """A whole word of `text` that is an identifier or number found in <= 2 database chunks."""
    for w in sorted(set(re.findall(r"\w+", text)), key=lambda w: (-len(w), w)):
        t = w.lower()
        if df.get(t, 99) <= 2 and ("_" in w or any(c.isdigit() for c in w) or len(w) >= 10):
            return t
    return None


def spelt_out(words: list[str]) -> str:
    """Identifiers as words, punctuation dropped: `parse_header(HTTPServer)` -> 'parse header
    http server'."""
    out = []
    for w in re.findall(r"\w+", " ".join(words)):
        out += identifier_parts(w) or [w.lower()]
    return " ".join(out)


def inflect(word: str) -> str:
    """A fixed other form of an English word (plural <-> singular, -e -> -ing, -ing / -ed cut)."""
    if len(word) < 5 or not word.isalpha():
        return word
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    for end, repl in (("ing", ""), ("ed", ""), ("e", "ing")):
        if word.endswith(end):
            return word[: -len(end)] + repl
    return word + "s"


KINDS = ("fragment", "paraphrase", "inflected")


def make_query(words: list[str], kind: str) -> str:
    if kind == "fragment":
        return " ".join(words)
    spelt = spelt_out(words)
    return spelt if kind == "paraphrase" else " ".join(inflect(w) for w in spelt.split())


def query_set(texts: list[str], chunk_ids: np.ndarray, doc_of: np.ndarray, df: dict, n: int,
              seed: int) -> list[dict]:
    """[{query, kind, token, answers, doc}] from database chunks holding a rare token."""
    rng = np.random.default_rng(seed)
    holders: dict[str, list[int]] = {}
    picked = []
    for row in rng.permutation(len(texts)):
        words = texts[row].split()
        tok = rare_token(texts[row], df) if len(words) >= MIN_WORDS else None
        if tok is None or tok in holders:
            continue
        at = next(i for i, w in enumerate(words) if tok in tokenize(w))
        start = int(np.clip(at - rng.integers(0, WINDOW), 0, len(words) - WINDOW))
        holders[tok] = []
        picked.append((row, tok, words[start: start + WINDOW]))
        if len(picked) == n:
            break
    for row, text in enumerate(texts):  # every chunk holding a picked token answers its query
        for t in set(tokenize(text)) & holders.keys():
            holders[t].append(int(chunk_ids[row]))
    return [{"query": make_query(w, KINDS[i % 3]), "kind": KINDS[i % 3], "token": tok,
             "answers": holders[tok], "doc": int(doc_of[row])}
            for i, (row, tok, w) in enumerate(picked)]


def hits(ids: np.ndarray, qs: list[dict], k: int) -> np.ndarray:
    return np.array([len(set(ids[i, :k].tolist()) & set(q["answers"])) > 0
                     for i, q in enumerate(qs)], np.float64)


def interval(h: np.ndarray, docs: np.ndarray) -> tuple[float, tuple[float, float]]:
    """recall and its 95% bootstrap interval over documents (hits ÷ queries, a ratio of sums)."""
    codes, doc = np.unique(docs, return_inverse=True)
    per = np.bincount(doc, weights=h, minlength=len(codes))
    return ratio_interval(per, np.bincount(doc, minlength=len(codes)).astype(float))


def paired(a: np.ndarray, b: np.ndarray, docs: np.ndarray) -> tuple[float, tuple[float, float]]:
    codes, doc = np.unique(docs, return_inverse=True)
    pa, pb = (np.bincount(doc, weights=x, minlength=len(codes)) for x in (a, b))
    return ratio_delta_interval(pa, pb, np.bincount(doc, minlength=len(codes)).astype(float))


def timed(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="work-hybrid")
    ap.add_argument("--max-bytes", type=int, default=1_500_000)
    ap.add_argument("--queries", type=int, default=450)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rrf-k", type=int, default=60)
    ap.add_argument("--weight", type=float, default=0.5)
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from ratray.build import build
    from ratray.index.embed import encode, load_encoder
    from ratray.index.service import ShardedIndex
    from ratray.index.store import load_manifest

    cfg = load_config(BuildConfig, None, [f"workdir={a.workdir}", f"corpus.max_bytes={a.max_bytes}",
                                          "index.factory=Flat", "index.shards=2",
                                          "index.recall_queries=100"])
    ray.init(num_cpus=2, include_dashboard=False, namespace="bench-hybrid", log_to_driver=False)
    t = time.perf_counter()
    summary = build(cfg, progress=False)
    print(f"workdir {a.workdir}: {summary['counts']['index_vectors']:,} database chunks, "
          f"index {'reused' if summary['index']['reused'] else 'built'} ({time.perf_counter() - t:.0f} s)")
    path = Path(summary["index"]["path"])
    m = load_manifest(path)
    table = pq.read_table(Path(summary["chunk_store"]["path"]) / "chunks.parquet",
                          columns=["chunk_id", "doc_id", "text"])
    db = np.sort(np.concatenate([np.load(path / s["ids"]) for s in m.shards]))
    texts = table.column("text").take(db).to_pylist()
    doc_of = np.unique(table.column("doc_id").take(db).to_numpy(zero_copy_only=False),
                       return_inverse=True)[1]
    df = load_keyword(path, 0, m).stats.df  # global document frequencies (all shards)
    qs = query_set(texts, db, doc_of, df, a.queries, a.seed)
    docs = np.array([q["doc"] for q in qs])
    print(f"query set: {len(qs)} queries ("
          + ", ".join(f"{sum(q['kind'] == kd for q in qs)} {kd}" for kd in KINDS)
          + f") from {len(set(docs))} documents; e.g. "
          + " | ".join(repr(q["query"]) for q in qs[:3]))

    enc = load_encoder(cfg.embed.model)
    t = time.perf_counter()
    qv = encode(enc, [q["query"] for q in qs], cfg.embed.batch_size)  # (b, d)
    embed_s = time.perf_counter() - t
    qtexts = [q["query"] for q in qs]
    client = ShardedIndex.launch(str(path), cfg.service)
    k, depth = a.k, min(a.depth, m.ntotal)
    modes = {"rrf": IndexConfig(hybrid="rrf", rrf_k=a.rrf_k, hybrid_weight=a.weight,
                                hybrid_depth=depth),
             "weighted": IndexConfig(hybrid="weighted", hybrid_weight=a.weight, hybrid_depth=depth)}
    try:
        dense = client.search(qv, depth)
        kw = client.keyword_search(qtexts, depth)
        results = {"dense": dense.ids, "bm25": kw.ids}
        for name, c in modes.items():
            results[f"hybrid-{name}"] = client.hybrid_search(qv, qtexts, k, c).ids
        speed = {"dense": timed(lambda: client.search(qv, k), a.reps),
                 "bm25": timed(lambda: client.keyword_search(qtexts, k), a.reps)}
        for name, c in modes.items():
            speed[f"hybrid-{name}"] = timed(lambda c=c: client.hybrid_search(qv, qtexts, k, c),
                                            a.reps)
    finally:
        client.shutdown()

    h = {name: hits(ids, qs, k) for name, ids in results.items()}
    out = {"queries": len(qs), "k": k, "depth": depth, "rrf_k": a.rrf_k, "weight": a.weight,
           "embed_queries_s": round(embed_s, 3), "recall": {}, "qps": {}, "by_kind": {}}
    print(f"\nrecall@{k} (95% bootstrap over documents)   queries/s through the actors "
          f"(batch of {len(qs)}, best / median of {a.reps})")
    for name in h:
        r, (lo, hi) = interval(h[name], docs)
        best, med = speed[name]
        out["recall"][name] = [round(r, 4), round(lo, 4), round(hi, 4)]
        out["qps"][name] = [round(len(qs) / best, 1), round(len(qs) / med, 1)]
        kinds = {kd: round(float(h[name][[q["kind"] == kd for q in qs]].mean()), 4)
                 for kd in KINDS}
        out["by_kind"][name] = kinds
        print(f"  {name:16s} {r:.3f} [{lo:.3f}, {hi:.3f}]  "
              + " ".join(f"{kd} {v:.3f}" for kd, v in kinds.items())
              + f"   {len(qs) / best:8.1f} / {len(qs) / med:8.1f} q/s")
    print(f"  (query embedding, not included above: {len(qs) / embed_s:.1f} q/s in-process)")
    for name in modes:
        for other in ("dense", "bm25"):
            d, (lo, hi) = paired(h[f"hybrid-{name}"], h[other], docs)
            out["recall"][f"hybrid-{name} - {other}"] = [round(d, 4), round(lo, 4), round(hi, 4)]
            print(f"  hybrid-{name} - {other}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")

    print(f"\nfusion grid (recall@{k}, the same depth-{depth} lists re-fused in-process):")
    grid = {}
    for mode, knob, values in (("rrf", "rrf_k", (5, 20, 60, 200)),
                               ("weighted", "hybrid_weight", (0.2, 0.35, 0.5, 0.65, 0.8))):
        row = []
        for v in values:
            c = IndexConfig(hybrid=mode, rrf_k=a.rrf_k if knob != "rrf_k" else v,
                            hybrid_weight=a.weight if knob != "hybrid_weight" else v)
            _, ids = fuse(dense.distances, dense.ids, m.metric, kw.distances, kw.ids, k, c)
            row.append(round(float(hits(ids, qs, k).mean()), 4))
        grid[f"{mode}:{knob}"] = dict(zip(map(str, values), row))
        print(f"  {mode:8s} {knob:13s} " + "  ".join(f"{v}: {r:.3f}" for v, r in zip(values, row)))
    out["grid"] = grid
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

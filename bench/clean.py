"""What the chunk store build's cleaning costs and finds, on a real corpus (default: the stdlib).

    python bench/clean.py [--corpus PATH] [--versions N] [--max-docs N] [--set corpus.key=value ...]

Reads the corpus once per row, side by side: the reader alone, the reader + cleaning with PII off,
the reader + cleaning with PII on (ratray/data/clean.py's pass 1: scrub, exact dedup, MinHash),
then `resolve` (LSH clusters, validation contamination). Prints seconds, MB/s, and what cleaning
found: PII by type, exact duplicate pairs, near-duplicate clusters, contaminated validation
documents (with examples). The chunk store build runs `read` once and `stream` twice (the two
later passes re-scrub only the documents pass 1 found PII in).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ratray.config import CorpusConfig, load_config  # noqa: E402
from ratray.data.clean import Cleaner  # noqa: E402
from ratray.data.corpus import SkipReport, iter_documents, split_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--versions", type=int, default=0)
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    sets = [f"corpus.{k}={v}" for k, v in (("path", a.corpus), ("versions", a.versions),
                                            ("max_docs", a.max_docs)) if v not in (None, 0)]

    @dataclasses.dataclass
    class Cfg:
        corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)

    cfg = load_config(Cfg, None, sets + a.overrides).corpus
    t = time.perf_counter()
    mb = sum(len(d.text.encode()) for d in iter_documents(cfg, SkipReport())) / 1e6
    rows = [("read only", time.perf_counter() - t, None)]
    for pii in ("off", "on"):
        c = dataclasses.replace(cfg, pii=pii)
        cleaner = Cleaner(c)
        t = time.perf_counter()
        n = sum(1 for _ in cleaner.read(iter_documents(c, SkipReport()), SkipReport()))
        rows.append((f"read + clean (pii {pii})", time.perf_counter() - t, cleaner))
    t = time.perf_counter()
    cleaner.resolve(lambda d: split_of(d, cfg), SkipReport())
    rows.append(("resolve (LSH)", time.perf_counter() - t, None))
    print(f"corpus: {cfg.path or 'stdlib'} ({mb:.1f} MB, {n} documents after exact dedup, "
          f"versions={cfg.versions})")
    base = rows[0][1]
    for name, s, _ in rows:
        print(f"  {name:26s} {s:7.2f} s  {mb / s:7.2f} MB/s  x{s / base:5.1f} the read")
    r = cleaner.report()
    nd, vc = r["near_duplicates"], r["val_contamination"]
    print(f"PII (when on): {r['pii']['counts']} in {r['pii']['documents']} documents")
    print(f"exact duplicates removed: {r['exact_duplicates']['removed']} "
          f"{r['exact_duplicates']['pairs'][:5]}")
    print(f"near-duplicates (Jaccard >= {nd['threshold']}, {nd['ngram']}-grams, {nd['num_perm']} perm): "
          f"{nd['clusters']} clusters of {nd['documents_in_clusters']} database documents; "
          f"examples {nd['cluster_ids'][:3]}")
    print(f"validation: {vc['contaminated']} of {vc['checked']} documents near-duplicate the database; "
          f"examples {list(vc['documents'].items())[:3]}")


if __name__ == "__main__":
    main()

"""REALM's held-out metrics with their counts and 95% bootstrap intervals.

    worker.evaluate: per held-out query (one row each, all ranks summed into one table) ─┐
      correct_* masked tokens right, exact_* all of them right (span exact match),       │
      masked, p_null p(∅|x), gold_known / gold_hit (the fact's block among the k-1)      │
    scored_queries: queries whose masked targets are all punctuation are left out ───────┤
    summarize ─► rates with retrieval and with the null document only, their difference ◄┘
                 (paired), recall@k of the gold block, mean p(∅|x); each with [lo, hi]

Intervals: ratray/eval/stats.py's percentile bootstrap of a ratio of sums, resampling clusters
(the fact of a knowledge query — its asks are not independent —, else the query's document): a
rate Σ hits / Σ totals is the bootstrap's "bits per byte" with nats = hits · ln 2, bytes = totals.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ratray.eval.stats import per_document, ratio_delta_interval, ratio_interval

ROW_FIELDS = ("correct_retrieval", "correct_null", "exact_retrieval", "exact_null", "masked",
              "p_null", "gold_known", "gold_hit")


def scored_queries(labels: np.ndarray, tokenizer, ignore: int = -100) -> np.ndarray:
    """labels (n q) -> (n,) True where some masked target holds a letter or digit."""
    alnum = {}

    def has_alnum(i: int) -> bool:
        if i not in alnum:
            alnum[i] = any(c.isalnum() for c in (tokenizer.id_to_token(int(i)) or "").removeprefix("##"))
        return alnum[i]

    return np.array([any(has_alnum(i) for i in row[row != ignore]) for row in labels], dtype=bool)


def gold_hits(cand_ids: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """cand_ids (b k-1) retrieved block ids (-1 missing), gold (b,) (-1 unknown) -> (b,) 0/1."""
    return ((cand_ids == gold[:, None]) & (gold[:, None] >= 0)).any(1).astype(np.float64)


def _rate(hits, totals, cluster, n):
    h, t = per_document(cluster, hits, n), per_document(cluster, totals, n)
    keep = t > 0
    return ratio_interval(h[keep], t[keep])


def _delta(a, b, totals, cluster, n):
    ha, hb, t = (per_document(cluster, x, n) for x in (a, b, totals))
    keep = t > 0
    return ratio_delta_interval(ha[keep], hb[keep], t[keep])


def summarize(rows: dict[str, np.ndarray], cluster: np.ndarray, scored: np.ndarray, k1: int,
              prefix: str = "val_") -> dict:
    """Per-query rows (ROW_FIELDS, (n,) each) -> flat metrics: `<name>`, `<name>_lo`, `<name>_hi`
    for exact match and token accuracy (retrieval, null only, retrieval − null), recall@k of the
    gold block and p(∅|x); counts of queries scored, left out (punctuation only) and clusters."""
    s = scored & (rows["masked"] > 0)
    r = {k: np.asarray(v, dtype=np.float64)[s] for k, v in rows.items()}
    c = np.unique(cluster[s], return_inverse=True)[1] if s.any() else np.zeros(0, np.int64)
    n = int(c.max()) + 1 if len(c) else 0
    one = np.ones(len(c))
    out = {f"{prefix}scored_queries": int(s.sum()), f"{prefix}punct_only_queries": int((~scored).sum()),
           f"{prefix}clusters": n, f"{prefix}gold_known": int(r["gold_known"].sum()) if n else 0}
    if n == 0:
        return out
    named = {"exact_retrieval": _rate(r["exact_retrieval"], one, c, n),
             "exact_null": _rate(r["exact_null"], one, c, n),
             "exact_gain": _delta(r["exact_retrieval"], r["exact_null"], one, c, n),
             "token_acc_retrieval": _rate(r["correct_retrieval"], r["masked"], c, n),
             "token_acc_null": _rate(r["correct_null"], r["masked"], c, n),
             "token_acc_gain": _delta(r["correct_retrieval"], r["correct_null"], r["masked"], c, n),
             "p_null_mean": _rate(r["p_null"], one, c, n)}
    if r["gold_known"].sum() > 0:
        named[f"gold_recall_at_{k1}"] = _rate(r["gold_hit"], r["gold_known"], c, n)
    for name, (point, (lo, hi)) in named.items():
        out.update({f"{prefix}{name}": point, f"{prefix}{name}_lo": lo, f"{prefix}{name}_hi": hi})
    return out


def report_lines(m: dict, prefix: str = "val_") -> list[str]:
    """The held-out block of a run's summary, one metric a line."""
    lines = [f"held-out queries scored {m.get(prefix + 'scored_queries', 0)} (punctuation-only left "
             f"out {m.get(prefix + 'punct_only_queries', 0)}, clusters {m.get(prefix + 'clusters', 0)}, "
             f"gold known {m.get(prefix + 'gold_known', 0)})"]
    for key in sorted(k for k in m if k.startswith(prefix) and k + "_lo" in m):
        lines.append(f"  {key[len(prefix):]:<24} {m[key]:.4f}  [{m[key + '_lo']:.4f}, {m[key + '_hi']:.4f}]")
    return lines


def save_rows(path, rows: dict[str, np.ndarray], block_ids: np.ndarray, cluster: np.ndarray,
              scored: np.ndarray) -> None:
    """The per-query table of a held-out evaluation (ROW_FIELDS, the queries' block ids, clusters,
    scored), written atomically: runs over the same held-out queries compare row by row."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, block_ids=np.asarray(block_ids), cluster=cluster, scored=scored,
             **{k: np.asarray(v) for k, v in rows.items()})
    tmp.replace(path)


def load_rows(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray], k1: int) -> dict:
    """Two runs' held-out tables (`load_rows`) over the same queries -> run a − run b, paired by
    cluster, with 95% intervals: span exact match and token accuracy with retrieval, gold recall."""
    if not np.array_equal(a["block_ids"], b["block_ids"]):
        raise ValueError("the two runs were evaluated on different held-out queries")
    s = a["scored"] & (a["masked"] > 0)
    c = np.unique(a["cluster"][s], return_inverse=True)[1]
    n = int(c.max()) + 1 if len(c) else 0
    if n == 0:
        return {}
    one = np.ones(int(s.sum()))
    out = {"exact_retrieval": _delta(a["exact_retrieval"][s], b["exact_retrieval"][s], one, c, n),
           "token_acc_retrieval": _delta(a["correct_retrieval"][s], b["correct_retrieval"][s],
                                         a["masked"][s], c, n)}
    if a["gold_known"][s].sum() > 0:
        out[f"gold_recall_at_{k1}"] = _delta(a["gold_hit"][s], b["gold_hit"][s], a["gold_known"][s], c, n)
    return {k: {"delta": float(p), "lo": float(lo), "hi": float(hi)} for k, (p, (lo, hi)) in out.items()}

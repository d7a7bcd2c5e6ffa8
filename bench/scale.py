"""How one IVF-PQ shard grows with n: build time, memory, bytes per vector, QPS at a set recall.

    python bench/scale.py [--sizes 100000,300000,1000000] [--dim 384] [--recall 0.9]
                          [--queries 500] [--k 10] [--reps 3] [--train-size 50000]
                          [--pq-tables off] [--out scale.json]
    python bench/scale.py capacity --from scale.json [--tokens-per-s 100000] ...  (docs/scaling.md)

For every size n, two fresh child processes (so each peak RSS is that size's own):
  build   synthetic vectors (bench/index_qps.py's calibrated generator, n + queries rows)
          ─ build_index(IVF{nlist},PQ{dim/2}, 1 shard, nprobe fixed later) ─ shard on disk;
          exact top-k of the held-out queries (the truth) saved next to it
  serve   RSS before/after load_shard (as an IndexShard actor loads it: IVF direct map on)
          ─ smallest power-of-two nprobe whose recall@k vs the truth reaches --recall
          ─ QPS of search_topk (the actor's own search code, all cores) at that nprobe
Bytes per vector are compared with the PQ code size (dim/2 bytes; target <= 1.3x), on disk
(the shard file + its id map) and in RAM (the serve child's RSS growth). Growth is fitted as a
log-log slope per figure (1.0 = linear in n). nlist = 4 sqrt(n), capped by the training sample
(--train-size / 39 lists), as factory.resolve_factory does for `auto`.

`capacity` turns a results file into the capacity table of docs/scaling.md (see `capacity_rows`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.index_qps import synthetic_embeddings  # noqa: E402
from ratray.config import IndexConfig  # noqa: E402
from ratray.eval.metrics import recall_at_k  # noqa: E402
from ratray.index.build import build_index  # noqa: E402
from ratray.index.factory import resolve_factory, set_search_params  # noqa: E402
from ratray.index.search import exact_search, search_topk  # noqa: E402
from ratray.index.store import load_manifest, load_shard  # noqa: E402

import numpy as np  # noqa: E402


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child_build(n: int, a: argparse.Namespace, work: Path) -> dict:
    """Build one shard of n vectors in `work`; save the held-out queries and their exact top-k."""
    t = time.perf_counter()
    x = synthetic_embeddings(n + a.queries, a.dim, seed=a.seed)  # (n + q, d)
    gen_s = time.perf_counter() - t
    vectors, queries = x[:n], x[n:]
    factory = resolve_factory(f"IVF{int(round(4 * math.sqrt(n)))},PQ{a.dim // 2}", n, a.dim,
                              n_train=min(n, a.train_size))
    cfg = IndexConfig(factory=factory, shards=1, nprobe=1, train_size=a.train_size,
                      pq_tables=a.pq_tables, seed=a.seed)
    t = time.perf_counter()
    m = build_index(vectors, np.arange(n, dtype=np.int64), work / "index", cfg,
                    embedding_model="synthetic")
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = exact_search(vectors, queries, a.k, "l2")  # (q, k) row positions = chunk ids
    exact_s = time.perf_counter() - t
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", truth)
    return {"n": n, "factory": m.factory, "nlist": m.extra["nlist"], "gen_s": gen_s,
            "build_s": build_s, "train_s": m.extra["timings"]["train_s"],
            "add_s": m.extra["timings"]["add_s"], "exact_s": exact_s,
            "pq_tables": m.extra.get("pq_tables"), "build_peak_rss": peak_rss_bytes()}


def child_serve(a: argparse.Namespace, work: Path) -> dict:
    """Load the shard as the actor does, pick nprobe for the recall, time searches."""
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    m = load_manifest(work / "index")
    before = rss_bytes()
    index, ids = load_shard(work / "index", 0, m)
    ram = rss_bytes() - before
    nprobe, recall, curve = 1, 0.0, []
    while True:
        set_search_params(index, nprobe=nprobe)
        _, got = search_topk(index, ids, queries, a.k, m.metric)
        recall = recall_at_k(got, truth)
        curve.append([nprobe, round(recall, 4)])
        if recall >= a.recall or nprobe >= m.extra["nlist"]:
            break
        nprobe *= 2
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        search_topk(index, ids, queries, a.k, m.metric)
        times.append(time.perf_counter() - t)
    disk = sum(f.stat().st_size for f in (work / "index").iterdir() if f.suffix != ".json")
    return {"nprobe": nprobe, "recall": recall, "nprobe_recall": curve,
            "qps": len(queries) / min(times), "qps_median": len(queries) / sorted(times)[len(times) // 2],
            "disk_bytes": disk, "ram_bytes": ram, "serve_peak_rss": peak_rss_bytes()}


def fit_slope(ns: list[int], ys: list[float]) -> float:
    """Log-log slope of y against n: y ~ n^slope (1 = linear)."""
    return float(np.polyfit(np.log(ns), np.log(ys), 1)[0])


def run_sizes(a: argparse.Namespace) -> dict:
    rows = []
    for n in a.sizes:
        with tempfile.TemporaryDirectory(prefix="ratray-scale-") as tmp:
            row: dict = {}
            for step in ("build", "serve"):
                cmd = [sys.executable, __file__, f"--child-{step}", str(n), "--work", tmp,
                       *a.passthrough]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"n={n} {step} failed:\n{out.stderr[-3000:]}")
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
            code = a.dim // 2  # PQ code bytes per vector
            row.update(code_bytes=code, disk_per_vec=row["disk_bytes"] / n,
                       ram_per_vec=row["ram_bytes"] / n)
            row.update(disk_x_code=row["disk_per_vec"] / code, ram_x_code=row["ram_per_vec"] / code)
            rows.append(row)
            print(f"n={n:,}: built in {row['build_s']:.1f} s, nprobe {row['nprobe']} "
                  f"recall {row['recall']:.3f}, {row['qps']:.0f} QPS", flush=True)
    ns = [r["n"] for r in rows]
    fits = {key: fit_slope(ns, [r[key] for r in rows]) for key in
            ("build_s", "add_s", "build_peak_rss", "ram_bytes", "disk_bytes", "qps")} \
        if len(rows) > 1 else {}
    return {"dim": a.dim, "k": a.k, "recall_target": a.recall, "queries": a.queries,
            "reps": a.reps, "train_size": a.train_size, "cpus": len(os.sched_getaffinity(0)),
            "rows": rows, "slopes": fits}


def print_table(res: dict) -> None:
    print(f"\ndim={res['dim']} k={res['k']} recall target {res['recall_target']} "
          f"({res['queries']} held-out queries, exact truth) cpus={res['cpus']} "
          f"train_size={res['train_size']}")
    head = (f"{'n':>10} {'factory':<17}{'build s':>8}{'add s':>7}{'peak RSS':>10}{'nprobe':>7}"
            f"{'recall':>7}{'QPS':>7}{'disk B/v':>9}{'RAM B/v':>8}{'disk/code':>10}{'RAM/code':>9}")
    print(head + "\n" + "-" * len(head))
    for r in res["rows"]:
        print(f"{r['n']:>10,} {r['factory']:<17}{r['build_s']:>8.1f}{r['add_s']:>7.1f}"
              f"{r['build_peak_rss'] / 2**30:>8.2f}Gi{r['nprobe']:>7}{r['recall']:>7.3f}"
              f"{r['qps']:>7.0f}{r['disk_per_vec']:>9.1f}{r['ram_per_vec']:>8.1f}"
              f"{r['disk_x_code']:>10.2f}{r['ram_x_code']:>9.2f}")
    if res["slopes"]:
        print("growth, log-log slope vs n (1 = linear): " +
              ", ".join(f"{k} {v:.2f}" for k, v in res["slopes"].items()))


# ---------------------------------------------------------------------------------------------
# the capacity model (docs/scaling.md)


def capacity_rows(res: dict, corpus_sizes=(10**7, 10**8, 10**9, 10**10),
                  shard_max: int = 10_000_000, node_mem_gib: float = 256.0,
                  node_spare_gib: float = 8.0, node_cores: int = 64,
                  tokens_per_s: float = 100_000.0, chunk_tokens: int = 64,
                  embed_per_core: float = 25.0, embed_per_gpu: float = 1728.0, gpus: int = 64,
                  ) -> list[dict]:
    """Per corpus size: index bytes, shards, index nodes, retrieval load, embedding and refresh time.

    Measured here (res, its largest size): RAM and disk bytes per vector; search QPS of one shard
    per core at the recall target, extrapolated to a shard of `shard_max` vectors with the
    measured log-log slope of QPS vs n (probing the same fraction of the lists: pessimistic at
    billions, where a smaller fraction reaches the same recall); the add time per vector (linear:
    encoding is O(1) per vector). Given, not measured: embed_per_core (bench/embed.py's ~50
    chunks/s on 2 cores), embed_per_gpu (InstructRetro: 6.22M chunks per A100-hour; no GPU
    here), the training throughput and node sizes. Every chunk of every training sequence is one
    top-k query (online RETRO retrieval), fanned out to every shard. A REALM refresh re-embeds
    everything on `gpus` GPUs, then re-adds the vectors to all shards in parallel (2 cores each,
    the quantizer reused)."""
    big = max(res["rows"], key=lambda r: r["n"])
    slope = res["slopes"].get("qps", -1.0)
    need_qps = tokens_per_s / chunk_tokens
    out = []
    for n in corpus_sizes:
        shards = max(1, math.ceil(n / shard_max))
        per_shard = n / shards
        shard_gib = per_shard * big["ram_per_vec"] / 2**30
        qps_core = big["qps"] / res["cpus"] * (per_shard / big["n"]) ** slope  # one shard, one core
        cores = shards * need_qps / qps_core  # every query visits every shard
        mem_nodes = math.ceil(shards * shard_gib / (node_mem_gib - node_spare_gib))
        nodes = max(1, mem_nodes, math.ceil(cores / node_cores))
        add_s = big["add_s"] / big["n"] * per_shard
        embed_s = n / (embed_per_gpu * gpus)
        out.append({"chunks": n, "index_gib": n * big["ram_per_vec"] / 2**30,
                    "disk_gib": n * big["disk_per_vec"] / 2**30, "shards": shards,
                    "shard_gib": shard_gib, "need_qps": need_qps, "qps_core": qps_core,
                    "cores": cores, "nodes": nodes,
                    "node_mem_gib": shards * shard_gib / nodes + node_spare_gib,
                    "embed_core_h": n / embed_per_core / 3600,
                    "embed_gpu_h": n / embed_per_gpu / 3600,
                    "refresh_h": (embed_s + add_s) / 3600})
    return out


def capacity_markdown(rows: list[dict], gpus: int = 64, node_cores: int = 64, **_) -> str:
    lines = ["| chunks | index RAM (disk) | shards × RAM | queries/s needed | QPS per shard-core "
             "(extrap.) | search cores | index nodes × RAM used | embed core-hours | embed "
             f"A100-hours | REALM refresh on {gpus} GPUs |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['chunks']:.0e} | {r['index_gib']:,.1f} GiB ({r['disk_gib']:,.1f}) | "
            f"{r['shards']:,} × {r['shard_gib']:.2f} GiB | {r['need_qps']:,.0f} | "
            f"{r['qps_core']:,.0f} | {r['cores']:,.0f} | {r['nodes']:,} × {r['node_mem_gib']:.0f} GiB"
            f" | {r['embed_core_h']:,.0f} | {r['embed_gpu_h']:,.1f} | {r['refresh_h']:,.2f} h |")
    return "\n".join(lines)


def capacity_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scale.py capacity", description=capacity_rows.__doc__)
    ap.add_argument("--from", dest="src", required=True, help="a results JSON of this script")
    ap.add_argument("--tokens-per-s", type=float, default=100_000.0)
    ap.add_argument("--shard-max", type=int, default=10_000_000)
    ap.add_argument("--node-mem-gib", type=float, default=256.0)
    ap.add_argument("--node-cores", type=int, default=64)
    ap.add_argument("--embed-per-core", type=float, default=25.0)
    ap.add_argument("--embed-per-gpu", type=float, default=1728.0)
    ap.add_argument("--gpus", type=int, default=64)
    a = ap.parse_args(argv)
    res = json.loads(Path(a.src).read_text())
    given = {k: getattr(a, k) for k in ("tokens_per_s", "shard_max", "node_mem_gib", "node_cores",
                                        "embed_per_core", "embed_per_gpu", "gpus")}
    print(capacity_markdown(capacity_rows(res, **given), **given))


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["capacity"]:
        return capacity_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--recall", type=float, default=0.9, help="recall@k vs exact to serve at")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=50_000)
    ap.add_argument("--pq-tables", default="off", help="on|off|auto (on: +nlist*M*1 KiB per shard)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child-build", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-serve", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_build or a.child_serve:
        work = Path(a.work)
        r = child_build(a.child_build, a, work) if a.child_build else child_serve(a, work)
        print(json.dumps(r, default=float))
        return r
    try:
        a.sizes = sorted(int(s) for s in a.sizes.split(","))
    except ValueError:
        ap.error(f"--sizes must be comma-separated integers, got {a.sizes!r}")
    if min(a.sizes) <= a.queries or not 0 < a.recall <= 1:
        ap.error("every size must exceed --queries, and --recall must be in (0, 1]")
    a.passthrough = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
                     ("dim", "recall", "queries", "k", "reps", "train_size", "pq_tables", "seed")]
    res = run_sizes(a)
    print_table(res)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=float))
        print(f"results written to {a.out}")
    return res


if __name__ == "__main__":
    main()

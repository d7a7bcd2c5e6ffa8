"""The living database, shown: a trained RETRO run reads documents added after training, without
retraining, and forgets them when they are removed (issue 14; RETRO §4, Atlas's index updates).

    prepare   a corpus folder with `held` documents taken out (their originals kept aside in held/)
              and an edited version of each held document (related/: the near-duplicates the model
              will be scored on; ids of their own, so the leakage filter never hides their twins)
    build + train on corpus/ as usual (jobs/build_index.py, jobs/retro_pretrain.py)
    run       shard actors serve the run's index as a service, a thread searches through them
              without pause (every failure counted, every version seen recorded), and then:
                1. evaluate related/ through the service            bpb before
                2. update_index --add held/  (hot swap)             bpb after; a generation whose
                                                                    neighbours come from held/
                3. update_index --remove every held id (hot swap)   bpb removed
              paired differences (bootstrap over documents) after − before and removed − before

Writes <workdir>/experiments/<name>/live.json and live.md.
"""
from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np

from ratray.config import ConfigError, CorpusConfig
from ratray.workdir import Workdir

MIN_HELD_BYTES = 2_000  # a held document long enough for several chunks


# ---------------------------------------------------------------------------------------------
# prepare: corpus/ without the held documents, held/ (their originals), related/ (edited copies)


def related_name(doc_id: str) -> str:
    """The file name of a held document's edited version: its own id, never the original's."""
    p = Path(doc_id)
    return str(p.with_name(f"{p.stem}.related{p.suffix or '.txt'}"))


def prepare(out: str | Path, corpus: CorpusConfig, held: int = 12, seed: int = 0) -> dict:
    """Write out/corpus, out/held and out/related from `corpus` (read and validated as a build
    reads it; its versions are left to the build). Returns the held ids and counts."""
    from ratray.data.corpus import SkipReport, iter_documents
    from ratray.data.versions import edited

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty")
    if held < 1:
        raise ConfigError(f"--held {held}: must be >= 1")
    docs = list(iter_documents(CorpusConfig(**{**corpus.__dict__, "versions": 0}), SkipReport()))
    big = [d.doc_id for d in docs if len(d.text.encode()) >= MIN_HELD_BYTES]
    if len(big) < 2 * held:
        raise ConfigError(f"--held {held}: the corpus has only {len(big)} documents of "
                          f">= {MIN_HELD_BYTES} bytes (need twice as many)")
    chosen = set(random.Random(seed).sample(sorted(big), held))
    for d in docs:
        where = ("held", d.doc_id) if d.doc_id in chosen else ("corpus", d.doc_id)
        for folder, name, text in [(*where, d.text)] + (
                [("related", related_name(d.doc_id), edited(d.text, d.doc_id, 1, seed))]
                if d.doc_id in chosen else []):
            path = out / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return {"out": str(out), "documents": len(docs), "held": sorted(chosen)}


# ---------------------------------------------------------------------------------------------
# a client that never stops searching: the proof that no query fails during a swap


class Searcher(threading.Thread):
    """Searches the service `name` in a loop (random unit queries, k=4) until `stop()`."""

    def __init__(self, name: str, namespace: str, batch: int = 8, pause_s: float = 0.01):
        super().__init__(daemon=True)
        from ratray.index.service import ShardedIndex

        self.client = ShardedIndex.connect(name, namespace)
        self.batch, self.pause_s, self._halt = batch, pause_s, threading.Event()
        self.ok, self.failed, self.errors, self.versions = 0, 0, [], {}

    def run(self) -> None:
        rng = np.random.default_rng(0)
        while not self._halt.is_set():
            q = rng.standard_normal((self.batch, self.client.dim)).astype(np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            try:
                res = self.client.search(q, 4)
                self.ok += 1
                self.versions[int(res.version)] = self.versions.get(int(res.version), 0) + 1
            except Exception as e:  # counted and reported, never hidden
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {e}"[:300])
            time.sleep(self.pause_s)  # a client's pace, not a busy loop that starves the others

    def stop(self) -> dict:
        self._halt.set()
        self.join(timeout=120)
        return {"searches": self.ok, "failed": self.failed, "errors": self.errors[:5],
                "versions_seen": {str(k): v for k, v in sorted(self.versions.items())}}


# ---------------------------------------------------------------------------------------------
# run: before, add, after, remove, removed


def _per_doc(report: dict, model: str) -> dict[str, tuple[float, float]]:
    """doc id → (nats, bytes) of `model`'s row, from an evaluation's per_chunk.parquet."""
    import pyarrow.parquet as pq

    t = pq.read_table(Path(report["out_dir"]) / "per_chunk.parquet").to_pydict()
    out: dict[str, list[float]] = {}
    for d, n, b in zip(t["doc_id"], t[f"nats[{model}]"], t["bytes"]):
        acc = out.setdefault(d, [0.0, 0.0])
        acc[0] += n
        acc[1] += b
    return {d: (v[0], v[1]) for d, v in out.items()}


def paired(a: dict, b: dict, n_boot: int, seed: int) -> dict:
    """b − a in bits per byte over the documents both scored, with its paired 95% interval."""
    from ratray.eval.stats import delta_interval

    docs = sorted(set(a) & set(b))
    na, nb = np.array([a[d][0] for d in docs]), np.array([b[d][0] for d in docs])
    by = np.array([a[d][1] for d in docs])
    delta, ci = delta_interval(nb, na, by, n_boot, seed)
    return {"delta_bpb": delta, "ci95": list(ci), "documents": len(docs)}


def _neighbour_share(gen: dict, held: set[str]) -> float:
    """Share of a generation's neighbours that are chunks of the held documents."""
    got = [n["doc_id"] for c in gen["chunks"] for n in c["neighbours"]]
    return sum(d in held for d in got) / len(got) if got else 0.0


def run(workdir: str, run_name: str, data: str | Path, name: str = "live", n_boot: int = 1000,
        seed: int = 0, max_tokens: int = 64, progress: bool = True) -> dict:
    """The experiment of the module docstring on `data` (what `prepare` wrote)."""
    import ray

    from ratray.config import ServiceConfig, to_dict
    from ratray.index.service import ShardedIndex
    from ratray.index.update import update_index
    from ratray.retro.evaluate import evaluate, load_run
    from ratray.retro.generate import GenerateSettings

    data, wd = Path(data), Workdir(workdir)
    for sub in ("held", "related"):
        if not (data / sub).is_dir():
            raise ConfigError(f"--data {data}: no {sub}/ folder (write it with `prepare`)")
    held_ids = sorted(str(p.relative_to(data / "held")) for p in (data / "held").rglob("*") if p.is_file())
    loaded = load_run(wd, run_name)
    if loaded.cfg.model != "retro":
        raise ConfigError(f"run '{run_name}' is a baseline: it reads no database")
    svc = ServiceConfig(**{**to_dict(loaded.job.service), "name": f"{run_name}-live"})
    if not ray.is_initialized():
        ray.init(namespace=svc.namespace, log_to_driver=False)
    t0 = time.perf_counter()
    service = ShardedIndex.launch(str(wd.index), svc)
    searcher = Searcher(svc.name, svc.namespace)
    searcher.start()
    tok = _tokenizer(loaded)
    pairs = [(data / "related" / related_name(h), data / "held" / h) for h in held_ids]
    pairs = [(r, h) for r, h in pairs if r.is_file()]
    gen_settings = GenerateSettings(max_tokens=max_tokens, index_name=svc.name, namespace=svc.namespace)
    ev = dict(index_name=svc.name, eval_corpus=str(data / "related"), fractions=(), n_boot=n_boot,
              seed=seed, progress=progress, log_mlflow=False)
    stages, updates, gens = {}, {}, {}
    try:
        stages["before"] = evaluate(workdir, run_name, **ev)
        gens["before"] = _generations(workdir, run_name, loaded, tok, pairs, max_tokens, gen_settings)
        updates["add"] = update_index(workdir, add=data / "held", service_name=svc.name)
        stages["after"] = evaluate(workdir, run_name, **ev)
        gens["after"] = _generations(workdir, run_name, loaded, tok, pairs, max_tokens, gen_settings)
        updates["remove"] = update_index(workdir, remove=held_ids, service_name=svc.name)
        stages["removed"] = evaluate(workdir, run_name, **ev)
    finally:
        queries = searcher.stop()
        service.shutdown()
    on = f"{run_name} RETRO[ON]"
    per = {k: _per_doc(r, on) for k, r in stages.items()}
    out = {
        "name": name, "run": run_name, "data": str(data), "held_documents": held_ids,
        "stages": {k: {"index_version": r["source"]["index"]["version"],
                       "rows": [{x: row[x] for x in ("model", "retrieval", "bpb", "ci95")}
                                for row in r["rows"]], "eval": r["eval"], "out_dir": r["out_dir"]}
                   for k, r in stages.items()},
        "after_minus_before": paired(per["before"], per["after"], n_boot, seed),
        "removed_minus_before": paired(per["before"], per["removed"], n_boot, seed),
        "updates": {k: {"version": u["version"], "chunks_added": u["store"]["chunks_added"],
                        "chunks_removed": u["store"]["chunks_removed"], "swap_s": u["timings"]["swap_s"],
                        "total_s": u["timings"]["total_s"], "chunks_per_s": u["chunks_per_s"],
                        "drift": u["drift"]} for k, u in updates.items()},
        "queries_during_updates": queries,
        "generation": {k: _generation_summary(g, set(held_ids), n_boot, seed, _best(gens)) for k, g in gens.items()},
        "copied_after_minus_before": _paired_share(gens, n_boot, seed),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    folder = wd.experiment(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "live.json").write_text(json.dumps(out, indent=2))
    (folder / "live.md").write_text(format_live(out))
    return out


def _tokenizer(loaded):
    from ratray.retro.driver import resolve

    return resolve(loaded.job).store.tokenizer


COPY_N = 8  # tokens: a generated n-gram found in the added original counts as copied


def copied_share(generated: list[int], source: list[int], n: int = COPY_N) -> float:
    """Share of the generated token n-grams that occur in `source` (0 when none is generated)."""
    grams = [tuple(generated[i: i + n]) for i in range(len(generated) - n + 1)]
    have = {tuple(source[i: i + n]) for i in range(len(source) - n + 1)}
    return sum(g in have for g in grams) / len(grams) if grams else 0.0


def _generations(workdir, run_name, loaded, tok, pairs, max_tokens: int, settings) -> list[dict]:
    """Greedy continuations of every related document's start (prompt + continuation fit the
    run's sequence), each with the share of its 8-grams copied from the held original."""
    from ratray.retro.generate import generate_run

    out = []
    for related, held in pairs:
        ids = tok.encode(related.read_text(encoding="utf-8"))
        prompt = tok.decode(ids[: max(loaded.cfg.chunk_tokens, loaded.cfg.seq_len - max_tokens)])
        g = generate_run(workdir, run_name, prompt, settings)
        g["copied_from_added"] = copied_share(g["tokens"], tok.encode(held.read_text(encoding="utf-8")))
        out.append(g)
    return out


def _best(gens: dict) -> int:
    """The document whose continuation after the add copies most: the example shown."""
    after = [g["copied_from_added"] for g in gens.get("after", [])]
    return int(np.argmax(after)) if after else 0


def _paired_share(gens: dict, n_boot: int, seed: int) -> dict:
    """after − before of the copied share (mean over documents), paired by document."""
    from ratray.eval.stats import ratio_delta_interval

    if "after" not in gens or "before" not in gens:
        return {}
    a, b = (np.array([g["copied_from_added"] for g in gens[k]]) for k in ("after", "before"))
    delta, ci = ratio_delta_interval(a, b, np.ones(len(a)), n_boot, seed)
    return {"delta": delta, "ci95": list(ci), "documents": len(a)}


def _generation_summary(gens: list[dict], held: set[str], n_boot: int, seed: int, example: int) -> dict:
    """Per stage: the mean copied share over the documents (bootstrap 95% interval), the share of
    neighbours from the added documents, and one document's generation as the example."""
    from ratray.eval.stats import ratio_interval

    share = np.array([g["copied_from_added"] for g in gens])
    mean, ci = ratio_interval(share, np.ones(len(share)), n_boot, seed)  # the mean over documents
    g = gens[min(example, len(gens) - 1)]
    return {"documents": len(gens), "copied_8gram_share": mean, "ci95": list(ci),
            "neighbours_from_added_documents": float(np.mean([_neighbour_share(x, held) for x in gens])),
            "versions": sorted({v for x in gens for v in x["index"]["versions"]}),
            "example": {"prompt": g["prompt"], "continuation": g["continuation"],
                        "copied_from_added": g["copied_from_added"],
                        "neighbours": [[n["doc_id"] for n in c["neighbours"]] for c in g["chunks"]]}}


def format_live(x: dict) -> str:
    ci = lambda c: f"[{c[0]:+.4f}, {c[1]:+.4f}]"  # noqa: E731
    lines = [f"# The living database: run {x['run']}, {len(x['held_documents'])} documents added "
             "after training, then removed", "",
             "| stage | index version | RETRO[ON] bpb | 95% CI | RETRO[OFF] bpb |", "|---|---|---|---|---|"]
    for k, s in x["stages"].items():
        on, off = s["rows"][0], s["rows"][1]
        lines.append(f"| {k} | {s['index_version']} | {on['bpb']:.4f} | [{on['ci95'][0]:.4f}, "
                     f"{on['ci95'][1]:.4f}] | {off['bpb']:.4f} |")
    for key, what in (("after_minus_before", "after − before"), ("removed_minus_before", "removed − before")):
        d = x[key]
        lines.append(f"\n{what}: {d['delta_bpb']:+.4f} bpb, paired 95% CI {ci(d['ci95'])} "
                     f"({d['documents']} documents)")
    c = x.get("copied_after_minus_before") or {}
    if c:
        lines.append(f"\ncopied {COPY_N}-gram share of greedy continuations, after − before: "
                     f"{c['delta']:+.1%}, paired 95% CI [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}] "
                     f"({c['documents']} documents)")
    q = x["queries_during_updates"]
    lines += ["", f"Searches through the service during both swaps: {q['searches']} answered, "
              f"{q['failed']} failed; versions seen {q['versions_seen']}."]
    for k, u in x["updates"].items():
        lines.append(f"- {k}: v{u['version']}, +{u['chunks_added']} / -{u['chunks_removed']} chunks, "
                     f"swap {u['swap_s']:.3f} s, update {u['total_s']:.1f} s ({u['chunks_per_s']} chunks/s)")
    for k, g in x["generation"].items():
        e = g["example"]
        lines += ["", f"## Generation {k} the add (index v{g['versions']}), greedy, {g['documents']} "
                  f"documents: {g['copied_8gram_share']:.1%} of generated {COPY_N}-token n-grams copied "
                  f"from the added originals (95% CI [{g['ci95'][0]:.1%}, {g['ci95'][1]:.1%}]); "
                  f"{g['neighbours_from_added_documents']:.0%} of neighbours from them",
                  "", f"Example ({e['copied_from_added']:.0%} copied):", "", "```",
                  e["prompt"][-300:] + " ⟶ " + e["continuation"], "```",
                  "neighbours per chunk: " + "; ".join(", ".join(n) for n in e["neighbours"])]
    return "\n".join(lines) + "\n"

"""Evaluate a trained RETRO run (what jobs/evaluate.py calls): held-out bits-per-byte with retrieval
on and off and of other runs on the same bytes (baselines; RETRO runs such as a RETROfit, with
retrieval on), RETRO's leakage analysis bpb(α), a database-size
curve without retraining, 95% intervals by bootstrap over documents, and the report.

    the run's config + checkpoint ─ Retro on this process's CPU
    the validation sequences the run trained against ─ neighbours: the run's own table (index as
        trained), or exact search of a share of the database's documents (the size curve)
    ─ nats and bytes per chunk slot (eval/lm) ─ per chunk, per document ─ bootstrap (eval/stats)
    ─ <run>/eval/: report.json, report.md, plots, per_chunk.parquet, per_document.parquet
      (also attached to the run's MLflow record)

Another run is compared only when it scores the very same validation bytes (same chunk store, same
sequence length); anything else is refused, naming what differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ratray.config import ConfigError, from_dict
from ratray.data.versions import original_id
from ratray.eval.overlap import by_overlap, overlap_ratios
from ratray.eval.stats import N_BOOT, bpb_interval, delta_interval, per_document, verdict
from ratray.retro.config import RetroConfig, RetroJobConfig
from ratray.workdir import Workdir

FRACTIONS = (0.1, 0.3, 1.0)  # shares of the database's documents: the size curve


@dataclass
class Loaded:
    name: str
    job: RetroJobConfig
    cfg: RetroConfig
    model: object  # ratray.retro.model.Retro, eval mode, CPU
    summary: dict
    run_dir: Path

    @property
    def non_embedding_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) - self.model.wte.weight.numel()


def val_neighbours(run: Loaded) -> np.ndarray:
    """The validation neighbours a RETRO run was evaluated with (stored by its driver)."""
    table = run.run_dir / "val_neighbours.npy"
    if not table.is_file():
        raise FileNotFoundError(f"run '{run.name}' has no validation neighbours at {table}")
    return np.load(table)


def load_run(wd: Workdir, name: str) -> Loaded:
    """A finished run's config and weights (from its last checkpoint)."""
    from ratray.eval.report import load_summary
    from ratray.retro.model import Retro
    from ratray.train.trainer import load_weights

    summary = load_summary(str(wd.root), name)
    if summary.get("model_type") not in ("retro", "baseline"):
        raise ConfigError(f"run '{name}' is a {summary.get('model_type')} run, not RETRO or baseline")
    saved = json.loads((wd.run(name) / "config.json").read_text())
    job = dataclasses.replace(from_dict(RetroJobConfig, saved["job"]), workdir=str(wd.root))  # (moved?)
    cfg = RetroConfig(**saved["model"])
    if not summary.get("checkpoint"):
        raise FileNotFoundError(f"run '{name}' has no checkpoint to evaluate")
    model = Retro(cfg)
    model.load_state_dict(load_weights(summary["checkpoint"]))
    return Loaded(name, job, cfg, model.eval(), summary, wd.run(name))


# ---------------------------------------------------------------------------------------------
# scoring


@dataclass
class Scored:
    """One (model, retrieval) row: nats and bytes per validation chunk slot (s l)."""
    model: str
    retrieval: str  # on | off | none (a baseline)
    non_embedding_params: int
    nats: np.ndarray
    bytes: np.ndarray


def score(run: Loaded, batches, nbr_ids: np.ndarray | None, rows: np.ndarray, label: str,
          retrieval: str) -> Scored:
    from ratray.eval.lm import slot_sums

    nats, nbytes, _ = slot_sums(run.model, batches, nbr_ids, rows, micro_batch=8, device="cpu")
    return Scored(label, retrieval, run.non_embedding_params, nats, nbytes)


# ---------------------------------------------------------------------------------------------
# retrieval against a chosen index: a version on disk, or running shard actors


def open_index(wd: Workdir, run: Loaded, index_version: int | None, index_name: str | None):
    """(client, owned, source): the shard actors to search. `index_name`: running actors (their
    serving version; `index_version`, if given, must be it); else fresh actors on
    `index_version`'s folder or on the serving version of the workdir's index (owned: shut down
    after)."""
    import ray

    from ratray.config import ServiceConfig, to_dict
    from ratray.index.service import ShardedIndex
    from ratray.index.store import is_versioned, load_manifest, serving_dir, version_dir, versions_on_disk

    svc = run.job.service
    if not ray.is_initialized():
        ray.init(namespace=svc.namespace, log_to_driver=False)
    if index_name:
        client = ShardedIndex.connect(index_name, svc.namespace, search_timeout=svc.timeout_s)
        serving = client.version()
        if index_version is not None and serving != index_version:
            raise ConfigError(f"--index-version {index_version}: the running index '{index_name}' "
                              f"serves version {serving}")
        return client, False, {"service": index_name, "version": serving}
    path = serving_dir(wd.index)
    if index_version is not None:
        on_disk = versions_on_disk(wd.index) if is_versioned(wd.index) \
            else [int(load_manifest(wd.index).version)]
        if index_version not in on_disk:
            raise ConfigError(f"--index-version {index_version}: {wd.index} holds version(s) "
                              f"{', '.join(map(str, on_disk))}")
        path = version_dir(wd.index, index_version) if is_versioned(wd.index) else wd.index
    name = f"{run.name}-eval-{os.getpid()}"
    client = ShardedIndex.launch(str(path), ServiceConfig(**{**to_dict(svc), "name": name}))
    return client, True, {"index_dir": str(path), "version": int(load_manifest(path).version)}


def eval_corpus_store(wd: Workdir, run: Loaded, store, path: str):
    """The documents at `path` (a file or folder), read and validated by the run's corpus readers
    (same formats, errors and counted skips) and cut by the run's tokenizer into `chunk_tokens`
    chunks, as a chunk store of their own whose chunks are all "val": <run>/eval/corpora/<hash>/
    (reused while the files and the run's store are unchanged). Returns (store, skip report)."""
    import pyarrow.parquet as pq

    from ratray.data.append import chunk_new_documents, update_corpus_config
    from ratray.data.corpus import CorpusError, corpus_fingerprint
    from ratray.data.store import STORE_VERSION, ChunkStore

    if not Path(path).exists():
        raise ConfigError(f"--eval-corpus {path}: no such file or folder")
    cfg = update_corpus_config(store, Path(path).resolve())  # the store's readers and cleaning
    key = hashlib.sha256(f"{corpus_fingerprint(cfg)}|{store.key}".encode()).hexdigest()[:16]
    out = wd.run_eval(run.name) / "corpora" / key
    if (out / "meta.json").is_file():
        return ChunkStore.open(out), json.loads((out / "meta.json").read_text())["skips"]
    try:
        table, n_read, skips, cleaned = chunk_new_documents(store, Path(path).resolve(), "val", 0)
    except CorpusError as e:
        raise ConfigError(f"--eval-corpus {path}: {e}") from None
    if table is None:
        raise ConfigError(f"--eval-corpus {path}: no document has a whole chunk "
                          f"({store.chunk_tokens} tokens); skipped: {skips.counts}")
    tmp = out.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(table, tmp / "chunks.parquet")
    shutil.copyfile(store.path / "tokenizer.json", tmp / "tokenizer.json")
    n = table.num_rows
    meta = {"version": STORE_VERSION, "key": f"eval-{key}", "source": str(path),
            "settings": {"chunks": {"chunk_tokens": store.chunk_tokens}},
            "tokenizer": {"kind": store.tokenizer_kind, "from_store": store.key},
            "counts": {"chunks": {"total": n, "train": 0, "val": n, "db": 0},
                       "documents": len(set(table.column("doc_id").to_pylist())),
                       "documents_read": n_read},
            "skips": skips.as_dict(), "clean": cleaned}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return ChunkStore.open(out), meta["skips"]


def search_rows(index, queries: np.ndarray, exclude: np.ndarray, docs, k: int, texts: list[str],
                hybrid, batch: int = 512) -> np.ndarray:
    """(q, d) query vectors, (q, E) excluded doc codes → (q, k) admissible neighbour ids; the
    first candidates fused with BM25 over `texts` when `hybrid.hybrid` is rrf | weighted."""
    from ratray.index.filtered import first_request, search_filtered

    ids = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(queries), batch):
        q, ex = queries[s: s + batch], exclude[s: s + batch]
        first = None
        if hybrid.hybrid != "off":
            K = first_request(index.ntotal, k, docs.excluded_chunks(ex))
            first = index.hybrid_search(q, texts[s: s + batch], K, hybrid)
        ids[s: s + batch], _ = search_filtered(index, q, ex, docs, k, first=first)
    return ids


def database_subset(store, fraction: float, seed: int) -> tuple[np.ndarray, int, int]:
    """Chunk ids of a seeded `fraction` of the database's documents (whole documents), the number
    of documents kept and of all database documents."""
    db = store.database_ids()
    doc_of = store.doc_ids(db).astype(str)
    docs = np.unique(doc_of)
    rng = np.random.default_rng(seed)
    keep = rng.permutation(docs)[: max(1, int(round(fraction * len(docs))))]
    return db[np.isin(doc_of, keep)], len(keep), len(docs)


# ---------------------------------------------------------------------------------------------
# the evaluation


def evaluate(workdir: str, run_name: str, compare: tuple[str, ...] = (),
             fractions: tuple[float, ...] = FRACTIONS, sequences: int = 0, seed: int = 0,
             n_boot: int = N_BOOT, progress: bool = True, log_mlflow: bool = True,
             index_version: int | None = None, index_name: str | None = None,
             eval_corpus: str | None = None) -> dict:
    """Score `run_name` (RETRO[ON], RETRO[OFF]; a baseline run: its one row) and the `compare` runs
    (a baseline: its row; a RETRO run: RETRO[ON]) on the run's validation sequences (`sequences`
    0 = all), or on the documents at `eval_corpus`; write and return the report.

    Neighbours: each RETRO run's own table (the index as it trained), unless `index_version`
    (a version of the workdir's index, on fresh shard actors), `index_name` (running shard actors,
    at their serving version) or `eval_corpus` is given: then every RETRO row reads neighbours
    searched now, through the actors, with the same leakage filter (no chunk of a document of
    the sequence; an evaluated document that is also in the database is excluded by its id)."""
    from ratray.index.filtered import DocCodes
    from ratray.index.search import ExactIndex
    from ratray.retro.batches import RetroBatches
    from ratray.retro.driver import resolve
    from ratray.retro.neighbours import (ChunkVectors, ensure_chunk_vectors, excluded_docs,
                                         search_layout, sequence_layout)

    t0 = time.perf_counter()
    wd = Workdir(workdir)
    run = load_run(wd, run_name)
    prep = resolve(run.job)  # the index and chunk store the run trained with
    store, l = prep.store, run.cfg.seq_len // run.cfg.chunk_tokens
    retro = run.cfg.model == "retro"
    searched = index_version is not None or bool(index_name) or eval_corpus is not None
    if (index_version is not None or index_name) and not retro:
        raise ConfigError(f"run '{run_name}' is a baseline: it reads no index (--index-version / "
                          "--index-name apply to RETRO runs)")
    source, source_info = store, {"split": "val"}  # whose chunks are scored
    if eval_corpus is not None:
        source, skipped = eval_corpus_store(wd, run, store, eval_corpus)
        source_info = {"eval_corpus": str(eval_corpus), "chunk_store": str(source.path),
                       "documents": int(source.meta["counts"]["documents"]), "skipped": skipped}
    layout = sequence_layout(source, "val", l)
    rows = np.arange(len(layout) if sequences == 0 else min(sequences, len(layout)))
    batches = RetroBatches(store, layout, run.cfg.k, source=source)

    on_ids = None  # (s l k) the neighbours every searched RETRO row reads
    if retro and searched:
        index, owned, source_info["index"] = open_index(wd, run, index_version, index_name)
        try:
            if source is store:
                vectors = ChunkVectors(ensure_chunk_vectors(store, run.job.embed, wd.embeddings,
                                                            wd.vectors, progress))
                on_ids, _ = search_layout(store, index, layout, run.cfg.k, vectors, progress=progress,
                                          hybrid=run.job.index)
            else:  # the evaluated documents' own vectors; exclusion by document id
                vectors = ChunkVectors(ensure_chunk_vectors(source, run.job.embed, wd.embeddings,
                                                            source.path, progress))
                docs = DocCodes(store)
                seq_docs = docs.of_documents(np.where(layout >= 0, source.doc_ids(np.maximum(layout, 0)), ""))
                source_info["documents_in_database"] = int(len(np.unique(seq_docs[seq_docs >= 0])))
                flat, excl = layout.reshape(-1), np.repeat(seq_docs, l, axis=0)
                live = np.flatnonzero(flat >= 0)
                on_ids = np.full((len(flat), run.cfg.k), -1, np.int64)
                on_ids[live] = search_rows(index, vectors[flat[live]], excl[live], docs, run.cfg.k,
                                           source.texts(flat[live]), run.job.index)
                on_ids = on_ids.reshape(*layout.shape, run.cfg.k)
        finally:
            if owned:
                index.shutdown()

    # rows: the run itself, then every compared run (same bytes or refused)
    scored: list[Scored] = []
    if retro:
        on_ids = val_neighbours(run) if on_ids is None else on_ids
        scored.append(score(run, batches, on_ids, rows, f"{run_name} RETRO[ON]", "on"))
        scored.append(score(run, batches, None, rows, f"{run_name} RETRO[OFF]", "off"))
    else:
        scored.append(score(run, batches, None, rows, run_name, "none"))
    for name in compare:
        other = load_run(wd, name)
        if resolve(other.job).store.key != store.key or other.cfg.seq_len != run.cfg.seq_len:
            raise ConfigError(f"run '{name}' was trained on another chunk store or sequence length "
                              f"than '{run_name}': not the same validation bytes")
        if other.cfg.model == "baseline":
            scored.append(score(other, batches, None, rows, name, "none"))
        elif searched and on_ids is None:
            raise ConfigError(f"run '{name}' is RETRO: compare it with a RETRO --run-name when "
                              "neighbours are searched")
        else:
            nbr = on_ids if searched else val_neighbours(other)
            scored.append(score(other, batches, nbr, rows, f"{name} RETRO[ON]", "on"))

    # chunks, documents, overlap r(C) with the neighbours read when predicting each chunk
    chunk_ids = layout[rows]  # (s l)
    live = chunk_ids >= 0
    # the bootstrap's unit: a document with its derived versions (corpus.versions), which are
    # not independent of it; dense 0..D-1 over the evaluated units
    codes, doc_of = np.unique([original_id(d) for d in source.doc_ids(chunk_ids[live]).astype(str)],
                              return_inverse=True)
    r = np.zeros(chunk_ids.shape)
    if on_ids is not None:
        toks = batches.tokens(rows).reshape(-1, run.cfg.chunk_tokens)  # (s*l m)
        prev = np.full(on_ids[rows].shape, -1, np.int64)
        prev[:, 1:] = on_ids[rows][:, :-1]  # chunk u is predicted through Ret(chunk u-1)
        nb = store.with_continuation(prev)  # (s l k 2m)
        n_tok = np.where(live, source.n_tokens(np.maximum(chunk_ids, 0)), 0).reshape(-1)
        pad = store.tokenizer.pad_id
        r = overlap_ratios(toks, n_tok, pad, nb.reshape(-1, *nb.shape[2:]), pad).reshape(chunk_ids.shape)
    D = len(codes)
    doc_bytes = per_document(doc_of, scored[0].bytes[live], D)

    def row(s: Scored) -> dict:
        bpb, ci = bpb_interval(per_document(doc_of, s.nats[live], D), doc_bytes, n_boot, seed)
        out = {"model": s.model, "non_embedding_params": int(s.non_embedding_params),
               "retrieval": s.retrieval, "bpb": bpb, "ci95": list(ci), "by_overlap": []}
        for alpha, sel in by_overlap(r[live]):
            dn = per_document(doc_of[sel], s.nats[live][sel], D)
            db = per_document(doc_of[sel], s.bytes[live][sel], D)
            b, c = bpb_interval(dn, db, n_boot, seed)
            out["by_overlap"].append({"alpha": alpha, "chunks": int(sel.sum()), "bpb": b, "ci95": list(c)})
        return out

    report_rows = [row(s) for s in scored]
    differences = []
    first = scored[0]
    for other in scored[1:]:
        delta, ci = delta_interval(per_document(doc_of, first.nats[live], D),
                                   per_document(doc_of, other.nats[live], D), doc_bytes, n_boot, seed)
        differences.append({"a": first.model, "b": other.model, "delta_bpb": delta, "ci95": list(ci),
                            "verdict": verdict(first.model, other.model, delta, ci)})

    # the decontaminated subset: validation documents that near-duplicate the database left out
    # (the chunk store's cleaning report: ratray/data/clean.py)
    decontaminated = None
    if source is store:
        from ratray.data.clean import contaminated_val_ids

        dirty = contaminated_val_ids(store.meta)
        keep = np.array([c not in dirty for c in codes], bool)  # (D,) units kept
        decontaminated = {"documents_left_out": int((~keep).sum()), "rows": []}
        if dirty and keep.any():
            for s_ in scored:
                dn, db = per_document(doc_of, s_.nats[live], D)[keep], doc_bytes[keep]
                bpb, ci = bpb_interval(dn, db, n_boot, seed)
                decontaminated["rows"].append({"model": s_.model, "bpb": bpb, "ci95": list(ci)})

    # the database-size curve: the same checkpoint, the database cut to a share of the documents
    size_curve = []
    if retro and fractions and not searched:  # the curve cuts the index the run trained with
        vectors = ChunkVectors(ensure_chunk_vectors(store, run.job.embed, wd.embeddings, wd.vectors,
                                                    progress))
        for f in sorted(fractions):
            ids, n_docs, all_docs = database_subset(store, f, seed)
            index = ExactIndex(vectors[ids], ids, metric=run.job.index.metric)
            nbr, _ = search_layout(store, index, layout, run.cfg.k, vectors, progress=progress,
                                   desc=f"neighbours[{f:.0%} of the database]")
            s = score(run, batches, nbr, rows, f"RETRO[ON] {f:.0%}", "on")
            bpb, ci = bpb_interval(per_document(doc_of, s.nats[live], D), doc_bytes, n_boot, seed)
            size_curve.append({"fraction": f, "documents": n_docs, "documents_share": n_docs / all_docs,
                               "chunks": int(len(ids)), "bpb": bpb, "ci95": list(ci)})

    report = {
        "run": run_name, "compared": list(compare), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": source_info,
        "rows": report_rows, "differences": differences, "database_size": size_curve,
        "decontaminated": decontaminated,
        "eval": {"sequences": int(len(rows)), "chunks": int(live.sum()), "documents": int(D),
                 "bytes": int(doc_bytes.sum()), "share_r_ge_0.5": float((r[live] >= 0.5).mean())
                 if live.any() else 0.0},
        "bootstrap": {"unit": "documents (one with its versions)", "resamples": n_boot, "level": 0.95,
                      "seed": seed},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tag = "" if not searched else (f"index-v{source_info['index']['version']}" if retro else "")
    tag += f"{'-' if tag else ''}corpus-{source.key[5:]}" if source is not store else ""
    out = write_report(wd, run, report, scored, chunk_ids, live, r, source, tag)
    if log_mlflow:
        attach_to_mlflow(run, out, f"eval/{tag}" if tag else "eval")
    return report


# ---------------------------------------------------------------------------------------------
# output


def write_report(wd: Workdir, run: Loaded, report: dict, scored: list[Scored], chunk_ids: np.ndarray,
                 live: np.ndarray, r: np.ndarray, store, tag: str = "") -> list[Path]:
    """report.json, report.md, the plots, per_chunk.parquet and per_document.parquet, in the run's
    eval/ folder (a `tag`: in eval/<tag>/, e.g. index-v3 for neighbours searched in version 3)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ratray.eval import plots
    from ratray.eval.report import format_evaluation

    out = wd.run_eval(run.name) / tag if tag else wd.run_eval(run.name)
    out.mkdir(parents=True, exist_ok=True)
    report["out_dir"] = str(out)
    files = [out / "report.json", out / "report.md"]
    files[0].write_text(json.dumps(report, indent=2))
    files[1].write_text(format_evaluation(report, markdown=True))
    files.append(plots.bpb_vs_params(report["rows"], out / "bpb_vs_params.png",
                                     f"{run.name}: validation bits-per-byte"))
    files.append(plots.bpb_by_overlap(report["rows"], out / "bpb_by_overlap.png",
                                      f"{run.name}: bpb(α), chunks with r(C) ≤ α"))
    if report["database_size"]:
        files.append(plots.bpb_vs_database(report["database_size"], out / "bpb_vs_database.png",
                                           f"{run.name}: database size, no retraining"))
    ids = chunk_ids[live]
    cols = {"chunk_id": ids, "doc_id": store.doc_ids(ids).astype(str),
            "slot": np.nonzero(live)[1].astype(np.int32), "overlap_r": r[live]}
    for s in scored:
        cols[f"nats[{s.model}]"] = s.nats[live]
    cols["bytes"] = scored[0].bytes[live]
    table = pa.table(cols)
    pq.write_table(table, out / "per_chunk.parquet")
    by_doc = table.group_by("doc_id").aggregate([(c, "sum") for c in cols if c.startswith(("nats", "bytes"))])
    pq.write_table(by_doc, out / "per_document.parquet")
    return files + [out / "per_chunk.parquet", out / "per_document.parquet"]


def attach_to_mlflow(run: Loaded, files: list[Path], where: str = "eval") -> None:
    """The report's files as artifacts of the run's MLflow record (under `where`); the run's
    description (its Overview in the UI) then shows the report's plots too."""
    from mlflow import MlflowClient

    from ratray.mlflow_view import describe_run

    ml = run.summary.get("mlflow") or {}
    if ml.get("run_id"):
        client = MlflowClient(ml["tracking_uri"])
        for f in files:
            client.log_artifact(ml["run_id"], str(f), where)
        describe_run(client, ml["run_id"])

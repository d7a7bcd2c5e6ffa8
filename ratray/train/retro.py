"""The RETRO pretraining driver: validate, prepare retrieval, run Ray Train, write the summary.

    validate config against the index + chunk store (before any work)
      └─ chunk vectors (.npy, from the embedding cache) ─ shard actors ─ neighbours (val always;
         train when precomputed) ─ TorchTrainer(train_loop) with DeepSpeed workers ─ summary.json

Re-running with the same `train.run_name` resumes from the run's last checkpoint (Ray Train V2:
same RunConfig(storage_path, name)).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from ratray.config import ConfigError, RetroJobConfig, ServiceConfig, to_dict
from ratray.data.chunks import ChunkStore

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# validation: everything that can be checked before any work


@dataclasses.dataclass
class Prepared:
    store: ChunkStore
    model: dict  # resolved RetroConfig fields
    index_dir: Path
    ntotal: int
    run_dir: Path


def resolve(job: RetroJobConfig) -> Prepared:
    """Open the index and chunk store and resolve the model config; ConfigError on any mismatch."""
    from ratray.build import index_dir
    from ratray.models.retro import RetroConfig
    from ratray.retrieval.index import load_manifest

    idir = index_dir(job.workdir)
    if not (idir / "manifest.json").is_file():
        raise ConfigError(f"no index in {idir} (manifest.json missing): build it first with "
                          f"`python jobs/build_index.py --workdir {job.workdir}`")
    manifest = load_manifest(idir)
    spath = Path(job.workdir) / "chunks" / manifest.chunk_store
    if not (spath / "meta.json").is_file():
        raise ConfigError(f"the index in {idir} was built from chunk store {manifest.chunk_store}, "
                          f"which is missing under {spath.parent}")
    store = ChunkStore.open(spath)
    m = dict(job.model)
    m.setdefault("chunk_size", store.chunk_tokens)
    if m["chunk_size"] != store.chunk_tokens:
        raise ConfigError(f"config 'model.chunk_size': {m['chunk_size']} does not match the chunk "
                          f"store's chunk size {store.chunk_tokens} ({spath})")
    m.update(vocab_size=store.tokenizer.vocab_size, pad_id=store.tokenizer.pad_id, model=job.model_type)
    try:
        mcfg = RetroConfig(**m)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config 'model': {e}") from None
    if mcfg.model == "retro" and mcfg.k > manifest.ntotal:
        raise ConfigError(f"config 'model.k': {mcfg.k} neighbours requested but the database holds "
                          f"only {manifest.ntotal} chunks")
    if mcfg.neighbour_len != 2 * store.chunk_tokens:
        raise ConfigError(f"config 'model.neighbour_len': must be 2 x chunk size "
                          f"({2 * store.chunk_tokens}): a neighbour and its continuation")
    if len(store.split_ids("val")) == 0:
        raise ConfigError(f"chunk store {spath} has no validation chunks (corpus.val_fraction)")
    run_dir = Path(job.workdir) / "runs" / job.train.run_name
    return Prepared(store, mcfg.to_dict(), idir, manifest.ntotal, run_dir)


# ---------------------------------------------------------------------------------------------
# the run


def run(job: RetroJobConfig, progress: bool = True) -> dict:
    """Train (or resume) and return the summary written to `<workdir>/runs/<run_name>/summary.json`."""
    import ray

    from ratray.build import embeddings_dir
    from ratray.retrieval.neighbours import ChunkVectors, ensure_chunk_vectors, precompute_neighbours
    from ratray.retrieval.service import ShardedIndex
    from ratray.train.loop import make_trainer, train_loop, write_summary

    t0 = time.perf_counter()
    job = dataclasses.replace(job, workdir=str(Path(job.workdir).resolve()))  # workers share paths
    prep = resolve(job)  # fails before any work
    t = job.train
    if not ray.is_initialized():
        ray.init(namespace=job.service.namespace, log_to_driver=True)
    prep.run_dir.mkdir(parents=True, exist_ok=True)
    store, mcfg = prep.store, prep.model
    l = mcfg["seq_len"] // mcfg["chunk_size"]
    retro = mcfg["model"] == "retro"

    # retrieval: chunk vectors, shard actors, neighbours
    svc = ServiceConfig(**{**to_dict(job.service), "name": f"{t.run_name}-index"})
    index = None
    paths = {}
    timings = {}
    if retro:
        tv = time.perf_counter()
        vec_path = ensure_chunk_vectors(store, job.embed, embeddings_dir(job.workdir),
                                        Path(job.workdir) / "vectors", progress)
        vectors = ChunkVectors(vec_path)
        index = ShardedIndex.launch(str(prep.index_dir), svc)
        splits = ["val"] + (["train"] if t.retrieval == "precomputed" else [])
        for split in splits:
            tab = precompute_neighbours(store, index, split, l, mcfg["k"], vectors, progress=progress)
            out = prep.run_dir / f"{split}_neighbours.npy"
            np.save(out, tab.ids)
            paths[f"{split}_neighbours"] = str(out)
            paths[f"{split}_neighbours_table"] = str(tab.path)
        paths["vectors_path"] = str(vec_path)
        timings["retrieval_prep_s"] = time.perf_counter() - tv

    loop_config = {"job": to_dict(job), "model": mcfg, "store_path": str(store.path),
                   "service_name": svc.name, "namespace": svc.namespace, "run_dir": str(prep.run_dir),
                   **paths}
    trainer = make_trainer(train_loop, loop_config, t, job.workdir)
    tf = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        if index is not None:
            index.shutdown()
    timings["fit_s"] = time.perf_counter() - tf
    timings["total_s"] = time.perf_counter() - t0
    metrics = dict(result.metrics or {})
    return write_summary(job, prep.run_dir, result, timings, head={
        "run_name": t.run_name,
        "model_type": mcfg["model"],
        "retrieval": t.retrieval if retro else "none",
        "steps": metrics.get("step"),
        "tokens": (metrics.get("step") or 0) * t.micro_batch * t.grad_accum * t.num_workers * mcfg["seq_len"],
        "final": metrics,
        "val_bpb_retro_on": metrics.get("val_bpb_retro_on"),
        "val_bpb_retro_off": metrics.get("val_bpb_retro_off", metrics.get("val_bpb")),
    }, tail={"model": mcfg})


# ---------------------------------------------------------------------------------------------
# reading a result back


def load_summary(workdir: str | Path, run_name: str) -> dict:
    path = Path(workdir) / "runs" / run_name / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary for run '{run_name}' at {path} (has it finished?)")
    return json.loads(path.read_text())


def format_summary(s: dict) -> str:
    """The human-readable result block printed at the end of a run and by `make demo`."""
    from ratray.tracking import ui_command

    on, off = s.get("val_bpb_retro_on"), s.get("val_bpb_retro_off")
    lines = [f"run {s['run_name']} ({s['model_type']}, retrieval: {s['retrieval']}): "
             f"{s['steps']} steps, {s['tokens']:,} tokens, {s['wall_time_s']:.0f} s"]
    if on is not None:
        lines.append(f"validation bits-per-byte  RETRO[ON] {on:.4f}   RETRO[OFF] {off:.4f}   "
                     f"(retrieval {'helps' if on < off else 'does not help yet'}: {off - on:+.4f})")
    else:
        lines.append(f"validation bits-per-byte  {off:.4f}")
    ml = s["mlflow"]
    lines += [f"checkpoint: {s['checkpoint']}",
              f"MLflow: {ml['tracking_uri']}  experiment '{ml['experiment']}'  run {ml['run_id']}",
              f"open the MLflow UI: {ui_command(ml['tracking_uri'])}",
              f"summary: {s['run_dir']}/summary.json"]
    return "\n".join(lines)

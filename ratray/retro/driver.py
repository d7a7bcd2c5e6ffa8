"""The RETRO pretraining driver (what jobs/retro_pretrain.py calls): validate, prepare retrieval,
run Ray Train, write the summary.

    validate config against the index + chunk store (before any work)
      └─ chunk vectors (.npy, from the embedding cache) ─ shard actors ─ neighbours (val always;
         train when precomputed) ─ TorchTrainer(worker.train_loop) with DeepSpeed workers
         ─ summary.json (+ MLflow)

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

from ratray.config import ConfigError, ServiceConfig, to_dict
from ratray.data.store import ChunkStore, ChunkStoreError
from ratray.retro.config import RetroConfig, RetroJobConfig
from ratray.workdir import Workdir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# validation: everything that can be checked before any work


@dataclasses.dataclass
class Prepared:
    store: ChunkStore
    model: RetroConfig  # complete: vocabulary, pad id and chunk length from the chunk store
    index_dir: Path
    ntotal: int
    run_dir: Path
    init: dict | None = None  # RETROfit: the baseline run's name, checkpoint and training tokens


def resolve(job: RetroJobConfig) -> Prepared:
    """Open the index and chunk store and complete the model config; ConfigError on any mismatch."""
    from ratray.index.store import MANIFEST, check_embedding_model, load_manifest, serving_dir
    from ratray.pretrained import model_id

    wd = Workdir(job.workdir)
    if not (wd.index / MANIFEST).is_file():
        raise ConfigError(f"no index in {wd.index} ({MANIFEST} missing): build it first with "
                          f"`python jobs/build_index.py --workdir {job.workdir}`")
    manifest = load_manifest(serving_dir(wd.index))  # after live updates: the version serving now
    check_embedding_model(wd.index, model_id(job.embed.model))  # the queries' model = the index's
    spath = wd.chunk_store(manifest.chunk_store)
    try:
        store = ChunkStore.open(spath)
    except ChunkStoreError as e:
        raise ConfigError(f"the index in {wd.index} was built from chunk store "
                          f"{manifest.chunk_store}: {e}") from None
    mcfg = job.model.for_store(store.tokenizer.vocab_size, store.tokenizer.pad_id, store.chunk_tokens)
    if mcfg.model == "retro" and mcfg.k > manifest.ntotal:
        raise ConfigError(f"config 'model.k': {mcfg.k} neighbours requested but the database holds "
                          f"only {manifest.ntotal} chunks")
    if mcfg.neighbour_len != 2 * store.chunk_tokens:
        raise ConfigError(f"config 'model.neighbour_len': must be 2 x chunks.chunk_tokens "
                          f"({2 * store.chunk_tokens}): a neighbour and its continuation")
    if len(store.split_ids("val")) == 0:
        raise ConfigError(f"chunk store {spath} has no validation chunks (corpus.val_fraction)")
    init = retrofit_source(wd, job, mcfg, store) if job.init_from else None
    return Prepared(store, mcfg, wd.index, manifest.ntotal, wd.run(job.train.run_name), init)


DECODER_FIELDS = ("vocab_size", "pad_id", "chunk_tokens", "n_layer", "n_head", "d_model", "bias")


def retrofit_source(wd: Workdir, job: RetroJobConfig, mcfg: RetroConfig, store: ChunkStore) -> dict:
    """The baseline run `job.init_from` RETROfits: finished, a baseline, the same decoder shape
    and chunk store; ConfigError naming what differs."""
    name, key = job.init_from, "config 'init_from'"
    summary_path = wd.run_summary(name)
    if not summary_path.is_file():
        raise ConfigError(f"{key}: no finished run '{name}' in {wd.runs} (no {summary_path.name})")
    summary = json.loads(summary_path.read_text())
    base = RetroConfig(**json.loads((wd.run(name) / "config.json").read_text())["model"])
    if base.model != "baseline":
        raise ConfigError(f"{key}: run '{name}' is a {base.model} run; RETROfit starts from a baseline")
    differ = [f for f in DECODER_FIELDS if getattr(base, f) != getattr(mcfg, f)]
    if differ:
        raise ConfigError(f"{key}: run '{name}' has another decoder: "
                          + ", ".join(f"model.{f} {getattr(base, f)} != {getattr(mcfg, f)}" for f in differ))
    if not summary.get("checkpoint"):
        raise ConfigError(f"{key}: run '{name}' has no checkpoint")
    return {"run": name, "checkpoint": summary["checkpoint"], "tokens": summary.get("tokens")}


# ---------------------------------------------------------------------------------------------
# the run


def run(job: RetroJobConfig, progress: bool = True) -> dict:
    """Train (or resume) and return the summary written to `<workdir>/runs/<run_name>/summary.json`."""
    import ray

    from ratray.index.service import ShardedIndex
    from ratray.retro.neighbours import ChunkVectors, ensure_chunk_vectors, precompute_neighbours
    from ratray.retro.worker import train_loop
    from ratray.train.trainer import make_trainer, write_summary

    t0 = time.perf_counter()
    wd = Workdir(job.workdir)
    job = dataclasses.replace(job, workdir=str(wd.root))  # workers share absolute paths
    prep = resolve(job)  # fails before any work
    t = job.train
    if not ray.is_initialized():
        ray.init(namespace=job.service.namespace, log_to_driver=True)
    prep.run_dir.mkdir(parents=True, exist_ok=True)
    store, mcfg = prep.store, prep.model
    l = mcfg.seq_len // mcfg.chunk_tokens
    retro = mcfg.model == "retro"

    # retrieval: chunk vectors, shard actors, neighbours
    svc = ServiceConfig(**{**to_dict(job.service), "name": f"{t.run_name}-index"})
    index = None
    paths = {}
    timings = {}
    if retro:
        tv = time.perf_counter()
        vec_path = ensure_chunk_vectors(store, job.embed, wd.embeddings, wd.vectors, progress)
        vectors = ChunkVectors(vec_path)
        index = ShardedIndex.launch(str(prep.index_dir), svc)
        splits = ["val"] + (["train"] if t.retrieval == "precomputed" else [])
        for split in splits:
            tab = precompute_neighbours(store, index, split, l, mcfg.k, vectors, progress=progress,
                                        hybrid=job.index)  # index.hybrid: dense + BM25 fused
            out = prep.run_dir / f"{split}_neighbours.npy"
            np.save(out, tab.ids)
            paths[f"{split}_neighbours"] = str(out)
            paths[f"{split}_neighbours_table"] = str(tab.path)
        paths["vectors_path"] = str(vec_path)
        timings["retrieval_prep_s"] = time.perf_counter() - tv

    loop_config = {"job": to_dict(job), "model": mcfg.to_dict(), "store_path": str(store.path),
                   "service_name": svc.name, "namespace": svc.namespace, "run_dir": str(prep.run_dir),
                   "init_checkpoint": prep.init["checkpoint"] if prep.init else None, **paths}
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
    tokens = (metrics.get("step") or 0) * t.micro_batch * t.grad_accum * t.num_workers * mcfg.seq_len
    retrofit = None
    if prep.init:  # what RETROfitting cost, next to what the baseline cost
        retrofit = {**prep.init, "baseline_tokens": prep.init["tokens"], "tokens": tokens,
                    "tokens_share": tokens / prep.init["tokens"] if prep.init.get("tokens") else None}
    return write_summary(job, prep.run_dir, result, timings, head={
        "run_name": t.run_name,
        "model_type": mcfg.model,
        "retrieval": t.retrieval if retro else "none",
        "steps": metrics.get("step"),
        "tokens": tokens,
        "retrofit": retrofit,
        "final": metrics,
        "val_bpb_retro_on": metrics.get("val_bpb_retro_on"),
        "val_bpb_retro_off": metrics.get("val_bpb_retro_off", metrics.get("val_bpb")),
    }, tail={"model": mcfg.to_dict()})

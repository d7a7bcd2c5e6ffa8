"""The REALM pretraining driver (what jobs/realm_pretrain.py calls): knowledge blocks, the first
index, the refresh service, Ray Train.

    validate config (before any work)
      └─ wordpiece chunk store (blocks of ≤ chunks.chunk_tokens) ─ doc tower from the pretrained encoder
         ─ RefreshService.initial: embed every block, build index v1 ─ shard actors (ShardedIndex)
         ─ TorchTrainer(worker.train_loop): DeepSpeed workers query the shards (prefetched one
           batch ahead) and, every `refresh.every` steps, hand the doc tower's weights to the
           refresh service, which re-embeds and hot-swaps the index while training goes on
         ─ summary.json (+ MLflow)

Everything of a run lives in `<workdir>/runs/<run_name>/` (its index versions under `index/`), so
re-running with the same `train.run_name` resumes: Ray Train restores the checkpoint, the refresh
service finds the index versions on disk and the worker restores the checkpoint's index version.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ratray.config import ConfigError, ServiceConfig, to_dict
from ratray.data.store import ChunkStore
from ratray.realm.config import RealmConfig, RealmJobConfig
from ratray.workdir import Workdir

# ---------------------------------------------------------------------------------------------
# the doc-tower embedder handed to the refresh service (runs in its Ray tasks)


class DocTowerEmbedder:
    """`embedder(weights, tokens (n t)) -> (n p)`: REALM's doc tower with the given weights."""

    def __init__(self, model: dict, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size
        self._tower = None

    def __getstate__(self) -> dict:
        return {"model": self.model, "batch_size": self.batch_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["batch_size"])

    def __call__(self, weights: dict, tokens: np.ndarray) -> np.ndarray:
        import torch

        from ratray.realm.model import Tower

        device = "cuda" if torch.cuda.is_available() else "cpu"  # a task given a GPU share sees one
        if self._tower is None:
            self._tower = Tower(RealmConfig(**self.model)).eval().to(device)
        self._tower.load_state_dict({k: torch.as_tensor(v).float() for k, v in weights.items()})
        out = []
        with torch.no_grad():
            for s in range(0, len(tokens), self.batch_size):
                x = torch.from_numpy(np.asarray(tokens[s:s + self.batch_size], dtype=np.int64))
                out.append(self._tower(x.to(device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.get("proj_dim", 128)), np.float32)


# ---------------------------------------------------------------------------------------------
# validation


@dataclasses.dataclass
class Prepared:
    store: ChunkStore
    model: RealmConfig  # complete: vocabulary, special ids and block length from the chunk store
    weights: Path  # the pretrained encoder's model.safetensors
    run_dir: Path
    index_root: Path


def with_knowledge(job: RealmJobConfig) -> RealmJobConfig:
    """knowledge=true: write the interpreter's facts (same tables, same bytes: a rerun reuses the
    chunk store) and read them as the corpus."""
    if not job.knowledge:
        return job
    from ratray.realm.knowledge import write_corpus

    path = str(job.corpus.path or Workdir(job.workdir).root / "knowledge" / "facts.jsonl")
    try:
        write_corpus(path, job.corpus.val_fraction, job.corpus.seed, tuple(job.knowledge_tables),
                     job.knowledge_asks)
    except ValueError as e:  # an unknown table
        raise ConfigError(f"config 'knowledge_tables': {e}") from None
    return dataclasses.replace(job, corpus=dataclasses.replace(job.corpus, path=str(path), format="jsonl"))


def resolve(job: RealmJobConfig, progress: bool = True) -> Prepared:
    """Build (or reuse) the wordpiece chunk store and resolve the model; ConfigError on mismatch."""
    from ratray.data.chunks import build_chunk_store
    from ratray.pretrained import PretrainedModelError, model_path

    try:
        weights = model_path(job.chunks.wordpiece_model) / "model.safetensors"
    except PretrainedModelError as e:  # a missing package/model is a config problem here
        raise ConfigError(f"config 'chunks.wordpiece_model': {e}") from None
    if not weights.is_file():
        raise ConfigError(f"config 'chunks.wordpiece_model': no model.safetensors at {weights}")
    wd = Workdir(job.workdir)
    with wd.locked("REALM chunk store build"):  # never beside a build writing the same store
        store = build_chunk_store(job.corpus, job.chunks, wd.chunks, progress)
    tok = store.tokenizer
    if getattr(tok, "kind", "bpe") != "wordpiece":
        raise ConfigError(f"chunk store {store.path} is not a wordpiece store")
    mcfg = job.model_for(tok, store.chunk_tokens)
    q = job.query_docs
    n_train = len(store.with_doc_prefix(q, store.split_ids("train")))
    n_val = len(store.with_doc_prefix(q, store.split_ids("val")))
    n_index = len(store.with_doc_prefix(job.index_docs))
    of_q = f" of documents '{q}*' (query_docs)" if q else ""
    if n_val == 0:
        raise ConfigError(f"chunk store {store.path} has no validation blocks{of_q} (corpus.val_fraction)")
    if n_index < mcfg.k:
        raise ConfigError(f"config 'model.k': {mcfg.k} candidates but the index would hold {n_index} "
                          f"blocks" + (f" (index_docs '{job.index_docs}')" if job.index_docs else ""))
    if job.train.micro_batch * job.train.num_workers > n_train:
        raise ConfigError(f"config 'train.micro_batch': a step needs {job.train.micro_batch} x "
                          f"{job.train.num_workers} queries, the train split has {n_train} blocks{of_q}")
    if job.answer_swap > 0:
        from ratray.realm.knowledge import gold_blocks

        train_q = store.with_doc_prefix(q, store.split_ids("train"))
        if not (gold_blocks(store, train_q)[0] >= 0).any():
            raise ConfigError(f"config 'answer_swap': {job.answer_swap} needs training queries whose gold "
                              f"block is known (a knowledge corpus: documents 'fact/<key>' and "
                              f"'ask/<key>/<i>'); chunk store {store.path} has none{of_q}")
    name = job.train.run_name
    return Prepared(store, mcfg, weights, wd.run(name), wd.run_index(name))


# ---------------------------------------------------------------------------------------------
# the run


def run(job: RealmJobConfig, progress: bool = True) -> dict:
    """Train (or resume) and return the summary written to `<run_dir>/summary.json`."""
    import ray

    from ratray.index.refresh import launch_refresh_service, put_weights
    from ratray.index.service import ShardedIndex
    from ratray.realm.heldout import report_lines
    from ratray.realm.model import Realm
    from ratray.realm.worker import train_loop
    from ratray.train.trainer import make_trainer, write_summary

    t0 = time.perf_counter()
    job = with_knowledge(dataclasses.replace(job, workdir=str(Workdir(job.workdir).root)))  # shared paths
    if not ray.is_initialized():
        ray.init(namespace=job.service.namespace, log_to_driver=True)
    prep = resolve(job, progress)
    t = job.train
    prep.run_dir.mkdir(parents=True, exist_ok=True)
    svc = ServiceConfig(**{**to_dict(job.service), "name": f"{t.run_name}-index"})

    # the first index version: the pretrained doc tower over every block (reused on resume)
    timings: dict[str, float] = {}
    ti = time.perf_counter()
    model = dataclasses.asdict(prep.model)
    embedder = DocTowerEmbedder(model)
    refresh = launch_refresh_service(prep.index_root, prep.store, job.index, svc, job.refresh, embedder,
                                     doc_prefix=job.index_docs)
    first = Realm.from_pretrained(prep.model, prep.weights).doc_state_dict()
    initial = ray.get(refresh.initial.remote(put_weights(first), 0))
    del first
    index = ShardedIndex.launch(str(prep.index_root), svc)
    timings["initial_index_s"] = time.perf_counter() - ti

    loop_config = {"job": to_dict(job), "model": model, "store_path": str(prep.store.path),
                   "weights": str(prep.weights), "service_name": svc.name,
                   "namespace": svc.namespace, "run_dir": str(prep.run_dir)}
    trainer = make_trainer(train_loop, loop_config, t, job.workdir)
    tf = time.perf_counter()
    try:
        result = trainer.fit()
        status = ray.get(refresh.status.remote())
    finally:
        index.shutdown()
        ray.kill(refresh, no_restart=True)
    timings["fit_s"] = time.perf_counter() - tf
    timings["total_s"] = time.perf_counter() - t0
    metrics = dict(result.metrics or {})
    return write_summary(job, prep.run_dir, result, timings, head={
        "run_name": t.run_name,
        "model_type": "realm",
        "steps": metrics.get("step"),
        "final": metrics,
        "val_acc_retrieval": metrics.get("val_acc_retrieval"),
        "val_acc_null": metrics.get("val_acc_null"),
        "val_retrieval_utility": metrics.get("val_retrieval_utility"),
        "heldout": report_lines(metrics),
        "refresh": {"every": job.refresh.every, "initial": initial,
                    **{k: status[k] for k in ("serving_version", "serving_step", "requested",
                                              "completed", "failed", "coalesced", "last_error")},
                    "history": status["history"]},
    }, tail={"chunk_store": str(prep.store.path), "model": model})

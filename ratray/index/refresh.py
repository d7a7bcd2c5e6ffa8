"""The embedding-refresh service: re-embed the corpus with new retriever weights, rebuild the
shards, hot-swap them under a new version — while training goes on (REALM's asynchronous index).

    trainer (rank 0) ── request([weights ref], step) ──► RefreshService actor (one refresh at a time)
                                                          │ embed: blocks split into parts, Ray tasks
                                                          │        (each loads the weights once)
                                                          │ build: build_index → versions/v00000N
                                                          └ swap:  ShardedIndex.swap (two-phase)
    shard actors keep answering from version N-1 until the commit; every answer names its version

- The weights travel through the object store: the caller `ray.put`s a state dict and passes the
  ref wrapped in a list, so the service forwards it to its embedding tasks without a copy.
- Only one refresh runs at a time. A request made while one runs is coalesced: it waits, and a
  newer request replaces it (the newest weights win). When the running refresh ends, the waiting
  one starts. Weights no newer (by training step) than those serving, running or waiting are
  dropped, so the index never goes back to older weights.
- A refresh that fails (an embedding task dies, memory runs out, the build or a shard's prepare
  raises) leaves the previous version serving; the failure is counted and reported in `status()`,
  and the next request (the trainer's next interval) tries again. Once CURRENT names the new
  version (the swap's commit point) there is no way back: a failure after it keeps that version
  (a restarted shard loads it) and asks the shards to commit again.
- The actor is restarted when it dies; the new one removes the half-built folders of the dead one
  and reads the serving version and every version's weights step back from disk.
- What embeds a block is not this module's business (retrieval never imports a model): the caller
  passes an `embedder`, a picklable callable `embedder(weights, tokens (n t)) -> vectors (n p)`.
- Staleness bookkeeping: every version remembers the training step of the weights it was built
  from; `status()` reports the serving version and that step, refresh wall times (embed, build,
  swap) and the re-embed throughput.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from ratray.config import IndexConfig, RefreshConfig, ServiceConfig
from ratray.data.store import ChunkStore
from ratray.index.build import build_index
from ratray.index.factory import IndexBuildError
from ratray.index.service import ShardedIndex
from ratray.index.store import (current_version, is_versioned, load_manifest, remove_leftovers,
                                remove_version, republish_version, serving_dir, version_dir,
                                versions_on_disk, write_current)

log = logging.getLogger(__name__)


class RefreshError(RuntimeError):
    """A refresh could not produce a new version (the previous one keeps serving)."""


# ---------------------------------------------------------------------------------------------
# embedding: parts of the corpus in parallel Ray tasks


def _embed_part(embedder: Callable, weights_box: list, store_path: str, ids: np.ndarray,
                chunk_tokens: int, threads: int) -> np.ndarray:
    import torch

    torch.set_num_threads(max(1, threads))
    weights = weights_box[0]
    if isinstance(weights, ray.ObjectRef):
        weights = ray.get(weights)
    tokens = ChunkStore.open(store_path).tokens(ids, pad_to=chunk_tokens)  # (n t)
    return np.asarray(embedder(weights, tokens), dtype=np.float32)


def embed_corpus(embedder: Callable, weights_box: list, store: ChunkStore, cfg: RefreshConfig,
                 progress: bool = True, doc_prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Every block of `store` whose document id starts with `doc_prefix` ("" = every block) →
    (ids (n,), vectors (n p)), with `cfg.num_workers` tasks in flight."""
    from tqdm.auto import tqdm

    ids = store.with_doc_prefix(doc_prefix)
    if len(ids) == 0:
        raise RefreshError(f"no block of {store.path} has a document id starting with {doc_prefix!r}")
    parts = np.array_split(ids, max(1, min(len(ids), cfg.num_workers * cfg.parts_per_worker)))
    task = ray.remote(_embed_part).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None,
                                           max_retries=0)
    out: list[np.ndarray | None] = [None] * len(parts)
    pending: dict = {}
    nxt = 0
    with tqdm(total=len(ids), desc="refresh: re-embed", unit="block", disable=not progress) as bar:
        while nxt < len(parts) or pending:
            while nxt < len(parts) and len(pending) < cfg.num_workers:
                pending[task.remote(embedder, weights_box, str(store.path), parts[nxt], store.chunk_tokens,
                                    cfg.threads)] = nxt
                nxt += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            out[i] = ray.get(done[0])
            bar.update(len(parts[i]))
    return ids, np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# the service


@dataclass
class RefreshRecord:
    version: int
    weights_step: int
    embed_s: float
    build_s: float
    swap_s: float
    total_s: float
    blocks: int
    blocks_per_s: float
    finished: float  # unix time


@dataclass
class RefreshState:
    """What `status()` reports, and what a checkpoint stores (`restore` takes it back)."""
    serving_version: int = 0
    version_steps: dict = field(default_factory=dict)  # version (str) → weights step
    requested: int = 0
    completed: int = 0
    failed: int = 0
    coalesced: int = 0
    running: bool = False
    running_step: int | None = None
    waiting_step: int | None = None
    last_error: str | None = None
    history: list = field(default_factory=list)  # RefreshRecord dicts, oldest first

    @property
    def serving_step(self) -> int | None:
        return self.version_steps.get(str(self.serving_version))


class RefreshService:
    """Ray actor (see `launch_refresh_service`): threaded, so `status()` answers during a refresh."""

    def __init__(self, root: str, store_path: str, index_cfg: dict, service_cfg: dict,
                 refresh_cfg: dict, embedder: Callable, embedding_model: str = "realm-doc-tower",
                 doc_prefix: str = ""):
        self.root = Path(root)
        self.doc_prefix = doc_prefix  # the index holds the blocks of these documents only
        self.store = ChunkStore.open(store_path)
        self.index_cfg = IndexConfig(**index_cfg)
        self.service_cfg = ServiceConfig(**service_cfg)
        self.cfg = RefreshConfig(**refresh_cfg)
        self.embedder, self.embedding_model = embedder, embedding_model
        self.state = RefreshState()
        self._lock = threading.Lock()
        self._waiting: tuple[list, int] | None = None
        self._index: ShardedIndex | None = None
        # a restarted actor: what its predecessor was writing when it died is garbage now (one
        # service per root, so no live writer); complete versions and CURRENT's stay
        removed = remove_leftovers(self.root)
        if removed:
            log.warning("refresh service at %s: removed leftovers of an interrupted refresh: %s",
                        self.root, ", ".join(removed))
        self._sync_serving_from_disk()

    # -- disk ----------------------------------------------------------------------------------

    def _sync_serving_from_disk(self) -> None:
        # every version's weights step too: a restarted service still drops requests with weights
        # older than those already built
        for v in versions_on_disk(self.root):
            try:
                step = load_manifest(version_dir(self.root, v)).extra.get("weights_step")
            except IndexBuildError as e:  # an unreadable old version does not stop the service
                log.warning("%s", e)
                continue
            if step is not None:
                self.state.version_steps.setdefault(str(v), int(step))
        if is_versioned(self.root):
            m = load_manifest(serving_dir(self.root))
            self.state.serving_version = int(m.version)

    def _prune(self) -> None:
        keep = max(1, self.cfg.keep_versions)
        keep_too = (self.state.serving_version, current_version(self.root))
        for v in versions_on_disk(self.root)[:-keep]:
            if v not in keep_too:
                remove_version(self.root, v)

    # -- one refresh ---------------------------------------------------------------------------

    def build_version(self, weights_box: list, step: int, progress: bool = True) -> tuple[int, dict]:
        """Embed every block with `weights`, build the next version's shards; swap nothing."""
        version = max([self.state.serving_version, *versions_on_disk(self.root)]) + 1
        t0 = time.perf_counter()
        ids, vectors = embed_corpus(self.embedder, weights_box, self.store, self.cfg, progress,
                                    self.doc_prefix)
        t1 = time.perf_counter()
        # the weights' step goes into the manifest: a restarted service reads it back
        build_index(vectors, ids, version_dir(self.root, version), self.index_cfg,
                    embedding_model=f"{self.embedding_model}@step{step}",
                    chunk_store=str(self.store.path), version=version,
                    extra_manifest={"weights_step": int(step)})
        t2 = time.perf_counter()
        return version, {"embed_s": t1 - t0, "build_s": t2 - t1, "blocks": len(ids)}

    def _record(self, version: int, step: int, t: dict, swap_s: float, total_s: float) -> dict:
        rec = RefreshRecord(version=version, weights_step=int(step), embed_s=round(t["embed_s"], 3),
                            build_s=round(t["build_s"], 3), swap_s=round(swap_s, 3),
                            total_s=round(total_s, 3), blocks=t["blocks"],
                            blocks_per_s=round(t["blocks"] / max(t["embed_s"], 1e-9), 1),
                            finished=time.time())
        with self._lock:
            self.state.serving_version = version
            self.state.version_steps[str(version)] = int(step)
            self.state.completed += 1
            self.state.last_error = None
            self.state.history.append(asdict(rec))
        return asdict(rec)

    def initial(self, weights_box: list, step: int = 0) -> dict:
        """Build the first version and point CURRENT at it (no shard actors exist yet). Reuses the
        serving version already on disk (a resumed run)."""
        if is_versioned(self.root):
            self._sync_serving_from_disk()
            return {"version": self.state.serving_version, "reused": True}
        t0 = time.perf_counter()
        version, t = self.build_version(weights_box, step)
        write_current(self.root, version_dir(self.root, version))
        rec = self._record(version, step, t, 0.0, time.perf_counter() - t0)
        return {**rec, "reused": False}

    def refresh_now(self, weights_box: list, step: int, progress: bool = True) -> dict:
        """One whole refresh in the caller's thread: embed, build, hot-swap. Raises on failure
        (the previous version keeps serving)."""
        t0 = time.perf_counter()
        version, t = self.build_version(weights_box, step, progress)
        t1 = time.perf_counter()
        try:
            self._service().swap(version_dir(self.root, version))
        except BaseException as e:
            if current_version(self.root) != version:  # failed before the commit point: unused
                remove_version(self.root, version)
                raise
            self._finish_commit(version, step, e)
        t2 = time.perf_counter()
        rec = self._record(version, step, t, t2 - t1, t2 - t0)
        self._prune()
        print(f"[ratray] index v{version} (weights of step {step}) serving: re-embedded "
              f"{rec['blocks']} blocks in {rec['embed_s']:.1f} s ({rec['blocks_per_s']:.0f}/s), "
              f"built in {rec['build_s']:.2f} s, swapped in {rec['swap_s']:.3f} s", flush=True)
        return rec

    def _finish_commit(self, version: int, step: int, error: BaseException) -> None:
        """The swap failed after CURRENT named `version` (its commit point: a shard restarted from
        then on loads it). Never back: `version` stays on disk and serves; the shards that did not
        commit are asked once more. Raises RefreshError if one still fails (a dead shard)."""
        with self._lock:
            self.state.serving_version = version
            self.state.version_steps[str(version)] = int(step)
        log.warning("swap to v%d failed after CURRENT named it (%s: %s): committing again",
                    version, type(error).__name__, error)
        try:
            ray.get([a.commit.remote(version) for a in self._service().actors], timeout=120)
        except Exception as e:  # noqa: BLE001 — reported with both causes
            raise RefreshError(f"v{version} is named by {self.root / 'CURRENT'} (kept, serving) but "
                               f"not every shard committed it: {type(error).__name__}: {error}; "
                               f"again: {type(e).__name__}: {e}"[:2000]) from None

    def _service(self) -> ShardedIndex:
        if self._index is None:
            self._index = ShardedIndex.connect(self.service_cfg.name, self.service_cfg.namespace,
                                               search_timeout=self.service_cfg.timeout_s)
        return self._index

    # -- asynchronous requests -----------------------------------------------------------------

    def request(self, weights_box: list, step: int) -> dict:
        """Ask for a refresh from these weights; returns at once. Coalesced if one is running."""
        with self._lock:
            self.state.requested += 1
            newest = max([-1, *(int(s) for s in self.state.version_steps.values()),
                          *(s for s in (self.state.running_step, self.state.waiting_step) if s is not None)])
            if int(step) <= newest:  # weights no newer than what serves, runs or waits: drop them
                self.state.coalesced += 1
                return {"started": False, "queued": False, "serving_version": self.state.serving_version}
            if self.state.running:
                if self._waiting is not None:
                    self.state.coalesced += 1  # the older waiting request is dropped: newest wins
                self._waiting = (weights_box, int(step))
                self.state.waiting_step = int(step)
                return {"started": False, "queued": True, "serving_version": self.state.serving_version}
            self._start(weights_box, int(step))
            return {"started": True, "queued": False, "serving_version": self.state.serving_version}

    def _start(self, weights_box: list, step: int) -> None:  # holds self._lock
        self.state.running, self.state.running_step = True, step
        threading.Thread(target=self._run, args=(weights_box, step), daemon=True,
                         name=f"refresh-step-{step}").start()

    def _run(self, weights_box: list, step: int) -> None:
        try:
            self.refresh_now(weights_box, step, progress=False)
        except BaseException as e:  # noqa: BLE001 — any failure leaves the old version serving
            msg = f"refresh from step {step} failed: {type(e).__name__}: {e}"
            log.error("%s\n%s", msg, traceback.format_exc())
            with self._lock:
                self.state.failed += 1
                self.state.last_error = msg[:2000]
        finally:
            with self._lock:
                self.state.running, self.state.running_step = False, None
                if self._waiting is not None:
                    box, s = self._waiting
                    self._waiting, self.state.waiting_step = None, None
                    self._start(box, s)

    def status(self) -> dict:
        with self._lock:
            out = asdict(self.state)
            out["serving_step"] = self.state.serving_step
            return out

    def wait_idle(self, timeout: float = 600) -> dict:
        """Block until no refresh runs or waits (tests, benchmarks, the end of a run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.state.running and self._waiting is None:
                    break
            time.sleep(0.05)
        return self.status()

    def restore(self, saved: dict) -> dict:
        """Take back the bookkeeping of a checkpoint and serve its index again (a resumed run must
        not see an index built from weights newer than its own) — republished under a new, higher
        version number, so the serving version never goes backwards. If that version's files are
        gone, the serving version stays and the caller should request a refresh."""
        with self._lock:
            for k in ("requested", "completed", "failed", "coalesced"):
                setattr(self.state, k, max(getattr(self.state, k), int(saved.get(k, 0))))
            self.state.version_steps.update({str(k): int(v) for k, v in saved.get("version_steps", {}).items()})
            self.state.history = list(saved.get("history", []))[-50:] or self.state.history
        want = int(saved.get("serving_version", 0))
        restored = False
        on_disk = versions_on_disk(self.root)
        served_as = want
        if want and want != self.state.serving_version and want in on_disk:
            step = self.state.version_steps.get(str(want))
            served_as = max([self.state.serving_version, *on_disk]) + 1
            self._service().swap(republish_version(self.root, want, served_as))
            with self._lock:
                self.state.serving_version = served_as
                if step is not None:
                    self.state.version_steps[str(served_as)] = step
            restored = True
        return {"serving_version": self.state.serving_version, "swapped": restored,
                "wanted": want, "available": served_as == self.state.serving_version}


def launch_refresh_service(root: str | Path, store: ChunkStore, index_cfg: IndexConfig,
                           service_cfg: ServiceConfig, refresh_cfg: RefreshConfig, embedder: Callable,
                           embedding_model: str = "realm-doc-tower", doc_prefix: str = ""):
    """The actor, named `<service.name>-refresh` in the service's namespace (a worker can find it);
    its versions index the blocks of the documents whose id starts with `doc_prefix` ("" = all).

    Restarted when it dies (its constructor cleans what the dead one half-wrote and reads the
    serving version back from disk), and calls in flight are redone: every method is safe to
    repeat (a redone request or refresh at worst builds one more version, never an older one)."""
    actor = ray.remote(RefreshService).options(
        name=f"{service_cfg.name}-refresh", namespace=service_cfg.namespace, get_if_exists=True,
        num_cpus=0, max_concurrency=4, max_restarts=-1, max_task_retries=-1)
    return actor.remote(str(Path(root).resolve()), str(store.path), asdict(index_cfg),
                        asdict(service_cfg), asdict(refresh_cfg), embedder, embedding_model, doc_prefix)


def put_weights(state_dict: dict[str, Any]) -> list:
    """A state dict into the object store, boxed so actors pass the ref on instead of the value."""
    return [ray.put(state_dict)]

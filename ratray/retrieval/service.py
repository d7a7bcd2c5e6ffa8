"""The index served by Ray actors: one `IndexShard` actor per shard, a `ShardedIndex` client.

    queries (b, d) ─ ray.put once ─┬─► IndexShard 0 .search(ref, k) ─► (b, k) dists, chunk ids ─┐
                                   ├─► IndexShard 1 ...                                          ├─ merge_topk ─► (b, k)
                                   └─► IndexShard S-1 ...                                        ┘

- Actors are named `<name>-shard-<i>` in an explicit namespace, so Ray Train workers (or any
  process of the cluster) find them with `ShardedIndex.connect(name, namespace)`.
- `max_restarts=-1` re-runs the constructor, which loads the shard from disk: a killed actor comes
  back with its shard. `max_task_retries=-1` retries an interrupted search (searches are
  idempotent), so a caller just sees a slower answer.
- Actors reserve `num_cpus` < 1 (0 by default): Ray Train workers that each need a CPU must never
  be starved by index actors. FAISS releases the GIL, so a threaded actor runs concurrent searches
  in parallel; admin calls (`info`, `ping`) have their own concurrency group and never queue
  behind searches.
- Every shard re-scores its candidates exactly (see `index.search_topk`), so the merged top-k does
  not depend on batch composition and exact ties come out by chunk id.
"""
from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray

from ratray.config import ServiceConfig
from ratray.retrieval.index import (configure_faiss, enable_reconstruct, load_manifest, load_shard,
                                    merge_topk, search_topk)


class ShardVersionError(RuntimeError):
    """Shards answered from different index versions (a swap is half-way; retry or relaunch)."""


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (b, {dim}) to match the index, got {q.shape}")
    return np.ascontiguousarray(q, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the actor


class IndexShard:
    """One shard of the index in one actor process.

    The plain class is wrapped by `ray.remote` (see `shard_actor_class`); its constructor loads
    the shard from disk, so a restarted actor serves exactly what it served before.
    """

    def __init__(self, index_dir: str, shard: int, omp_threads: int = 0):
        self.index_dir, self.shard = index_dir, shard
        self.manifest = load_manifest(index_dir)
        if omp_threads <= 0:  # share this node's cores among the shards (Ray sets 1 otherwise)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            omp_threads = max(1, cores // self.manifest.num_shards)
        configure_faiss(omp_threads)
        self.omp_threads = omp_threads
        self.index, self.ids = load_shard(index_dir, shard, self.manifest)
        self.exact_ties = enable_reconstruct(self.index)
        self.version = self.manifest.version
        self.started = time.time()
        self.searches, self.queries, self.search_s = 0, 0, 0.0  # served so far (diagnostics)
        self._lock = threading.Lock()  # searches run on several threads at once

    @ray.method(concurrency_group="search")
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """queries (b, d) -> distances (b, k') float32, chunk ids (b, k') int64, version.

        k' = min(k, shard size); the client merges shards of different sizes."""
        q = _check_queries(queries, self.manifest.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        t0 = time.perf_counter()
        configure_faiss(self.omp_threads)  # OpenMP thread counts are per calling thread
        D, I = search_topk(self.index, self.ids, q, k, self.manifest.metric,
                           exact_ties=self.exact_ties)
        with self._lock:
            self.searches, self.queries = self.searches + 1, self.queries + len(q)
            self.search_s += time.perf_counter() - t0
        return D, I, self.version

    @ray.method(concurrency_group="admin")
    def info(self) -> dict:
        m = self.manifest
        return {"shard": self.shard, "n_shards": m.num_shards, "version": self.version,
                "size": int(self.index.ntotal), "ntotal": m.ntotal, "factory": m.factory,
                "metric": m.metric, "dim": m.dim, "nprobe": m.nprobe, "ef_search": m.ef_search,
                "exact_ties": self.exact_ties, "omp_threads": self.omp_threads,
                "index_dir": self.index_dir, "pid": os.getpid(), "started": self.started,
                "searches": self.searches, "queries": self.queries,
                "search_s": round(self.search_s, 4)}

    @ray.method(concurrency_group="admin")
    def ping(self) -> int:
        return self.shard


@functools.lru_cache(maxsize=None)
def shard_actor_class(max_concurrency: int = 8):
    """`IndexShard` as a Ray actor class with `max_concurrency` search threads.

    Concurrency groups are fixed when the class is decorated (`.options()` cannot change them),
    hence one decorated class per size."""
    return ray.remote(concurrency_groups={"search": max_concurrency, "admin": 1})(IndexShard)


def actor_name(name: str, i: int) -> str:
    return f"{name}-shard-{i}"


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class SearchResult:
    distances: np.ndarray  # (b, k) float32: l2 ascending / ip descending
    ids: np.ndarray  # (b, k) int64 chunk ids, -1 only if the index holds fewer than k
    version: int  # the index version that answered (every shard agreed)


class SearchFuture:
    """An in-flight fan-out. `.result(timeout)`, `.done()`, or `await fut` inside async code.

    Lets a training loop ask for the next batch's neighbours while the current batch computes.
    """

    def __init__(self, refs: list, k: int, metric: str):
        self._refs, self._k, self._metric = refs, k, metric
        self._result: SearchResult | None = None

    def done(self) -> bool:
        if self._result is not None:
            return True
        ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0, fetch_local=False)
        return len(ready) == len(self._refs)

    def _merge(self, parts: list) -> SearchResult:
        versions = sorted({int(p[2]) for p in parts})
        if len(versions) != 1:
            raise ShardVersionError(f"shards answered from different index versions {versions}")
        D, I = merge_topk([p[0] for p in parts], [p[1] for p in parts], self._k, self._metric)
        self._result, self._refs = SearchResult(D, I, versions[0]), []
        return self._result

    def result(self, timeout: float | None = None) -> SearchResult:
        if self._result is None:
            self._merge(ray.get(self._refs, timeout=timeout))
        return self._result

    def __await__(self):
        async def wait() -> SearchResult:
            if self._result is None:
                self._merge(list(await asyncio.gather(*self._refs)))
            return self._result
        return wait().__await__()


# ---------------------------------------------------------------------------------------------
# the client


class ShardedIndex:
    """Client of the shard actors: fan-out search and exact merge, sync or async."""

    def __init__(self, actors: list, name: str, namespace: str, info: dict):
        self.actors, self.name, self.namespace = actors, name, namespace
        self.index_dir, self.metric, self.dim = info["index_dir"], info["metric"], info["dim"]
        self.ntotal = int(info["ntotal"])

    @property
    def num_shards(self) -> int:
        return len(self.actors)

    def __repr__(self) -> str:
        return (f"ShardedIndex({self.namespace}/{self.name}, shards={self.num_shards}, "
                f"ntotal={self.ntotal}, dim={self.dim}, metric={self.metric})")

    @classmethod
    def launch(cls, index_dir: str, service: ServiceConfig | None = None,
               timeout: float = 300) -> "ShardedIndex":
        """Create (or reuse, if already running) one named actor per shard; wait for all.

        Call from the driver: the actors are not detached and die with the job that made them.
        """
        svc = service or ServiceConfig()
        index_dir = os.path.abspath(index_dir)
        manifest = load_manifest(index_dir)  # fail here, clearly, not inside N actors
        for s in manifest.shards:
            for key in ("file", "ids"):
                if not os.path.isfile(os.path.join(index_dir, s[key])):
                    raise FileNotFoundError(f"index {index_dir}: missing shard file {s[key]}")
        actor_cls = shard_actor_class(svc.max_concurrency)
        actors = [actor_cls.options(name=actor_name(svc.name, i), namespace=svc.namespace,
                                    get_if_exists=True, lifetime=None, num_cpus=svc.num_cpus,
                                    max_restarts=-1, max_task_retries=-1)
                  .remote(index_dir, i, svc.omp_threads)
                  for i in range(manifest.num_shards)]
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"index shard actors {svc.name!r} did not come up within "
                               f"{timeout} s") from None
        stale = [inf["shard"] for inf in infos if inf["index_dir"] != index_dir]
        if stale:
            raise RuntimeError(f"actors {svc.namespace}/{svc.name}-shard-{stale} already serve "
                               f"another index ({infos[stale[0]]['index_dir']}): shut them down "
                               "or pick another service.name")
        return cls(actors, svc.name, svc.namespace, infos[0])

    @classmethod
    def connect(cls, name: str = "index", namespace: str = "ratray",
                timeout: float = 60) -> "ShardedIndex":
        """Find running shard actors by name, e.g. from a Ray Train worker; waits up to
        `timeout` seconds for shard 0 to appear, learns the shard count from its `info()`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                first = ray.get_actor(actor_name(name, 0), namespace=namespace)
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no index actor {actor_name(name, 0)!r} in namespace "
                                       f"{namespace!r}: launch it first (ShardedIndex.launch)"
                                       ) from None
                time.sleep(0.5)
        info = ray.get(first.info.remote(), timeout=timeout)
        actors = [first]
        for i in range(1, info["n_shards"]):
            try:
                actors.append(ray.get_actor(actor_name(name, i), namespace=namespace))
            except ValueError:
                raise RuntimeError(f"index actor {actor_name(name, i)!r} missing in namespace "
                                   f"{namespace!r} (shard 0 says there are {info['n_shards']})"
                                   ) from None
        return cls(actors, name, namespace, info)

    def search_async(self, queries: np.ndarray, k: int) -> SearchFuture:
        """Start a search on every shard at once; returns immediately."""
        q = _check_queries(queries, self.dim)  # (b, d)
        if not 0 < k <= self.ntotal:
            raise ValueError(f"k={k} is out of range: the index holds {self.ntotal} vectors")
        ref = ray.put(q)  # one copy in the object store, read by every shard
        return SearchFuture([a.search.remote(ref, k) for a in self.actors], k, self.metric)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Exact merged top-k over all shards: distances (b, k), chunk ids (b, k), version."""
        return self.search_async(queries, k).result()

    def info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])

    def shutdown(self) -> None:
        """Kill the shard actors (for good: no restart)."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []

"""The index served by Ray actors: one `IndexShard` actor per shard, a `ShardedIndex` client.

    queries (b, d) ─ socket channel ─┬─► IndexShard 0 search ─► (b, k) dists, chunk ids ─┐
                     (or a Ray call) ├─► IndexShard 1 ...                                  ├─ merge_topk ─► (b, k)
                                     └─► IndexShard S-1 ...                                ┘

- Ray places, names, restarts and hot-swaps the actors; searches travel over a TCP channel per
  shard (`wire.py`; a Ray call costs ~1.5 ms per actor here, more than FAISS needs for 8 queries),
  or a Ray call where a channel is off (`service.transport=ray`) or broke (a restarting actor).
- Actors are named `<name>-shard-<i>` in an explicit namespace, so Ray Train workers (or any
  process of the cluster) find them with `ShardedIndex.connect(name, namespace)`.
- `max_restarts=-1` re-runs the constructor, which loads the shard from disk: a killed actor comes
  back with its shard. `max_task_retries=-1` retries an interrupted search (searches are
  idempotent), so a caller just sees a slower answer.
- With `service.num_gpus` > 0 each actor requests that share of a GPU and serves its shard from a
  faiss-gpu copy behind one lock (FAISS GPU indexes take one call at a time; `gpu.py`);
  without a GPU (or an index type FAISS cannot move) it serves from the CPU and `info()` says why.
- Every wait for a shard is bounded by `service.timeout_s` (fanout.py): a shard that cannot be
  placed or is stuck fails the search (or the launch) with an error naming it and what Ray says
  it waits for, e.g. a resource no node has.
- Actors reserve `num_cpus` < 1 (0 by default): Ray Train workers must never be starved by index
  actors. FAISS releases the GIL, so concurrent searches run in parallel; admin calls (`info`,
  `ping`) have their own concurrency group and never queue behind searches.
- Every shard re-scores its candidates exactly (see `search.search_topk`), so the merged top-k does
  not depend on batch composition and exact ties come out by chunk id.

Keyword (BM25) shards, where the index has them (keyword.py): each actor loads its shard with
the version's global statistics next to the FAISS shard, so they swap together; `keyword_search`
(plain Ray calls) merges exactly, `hybrid_search` fuses it with the dense top-k (`index.hybrid`).

Versions and hot swaps (REALM's refreshed index). An index root is either a plain index folder
or a versioned one (`versions/vNNNNNN/` + `CURRENT`; the format is `store.py`'s).
`ShardedIndex.swap(new_dir)` is a two-phase commit:

    prepare: every shard loads its new shard next to the serving one (searches go on meanwhile)
    CURRENT: rewritten atomically (a shard restarted from now on loads the new version)
    commit:  every shard flips a pointer; the previous version stays loaded as a fallback

Every answer carries the version that served it. A fan-out that catches the commit half-way
re-asks the lagging shards for the newer version (prepared: they hold it), so a query is never
served by two versions nor fails because of a swap. Versions only move forward; a failed prepare
aborts on every shard and changes nothing.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from ratray.config import ServiceConfig
from ratray.index.factory import configure_faiss
from ratray.index.fanout import (ShardTimeoutError, ShardVersionError, SearchFuture,  # noqa: F401
                                 actor_name, wait_infos)
from ratray.index.keyword import fuse, load_keyword
from ratray.index.search import SearchResult, enable_reconstruct, merge_topk, search_topk
from ratray.index.store import load_manifest, load_shard, serving_dir, write_current
from ratray.index.wire import Channels, ShardServer


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (b, {dim}) to match the index, got {q.shape}")
    return np.ascontiguousarray(q, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the actor


@dataclass
class _Loaded:
    """One version of this actor's shard, in memory."""
    version: int
    path: str
    manifest: object
    index: object  # a faiss.Index, or a gpu.GpuIndex (one lock per GPU index)
    ids: np.ndarray
    exact_ties: bool
    vectors: np.ndarray | None = None  # flat storage for exact re-scoring when on the GPU
    keyword: object = None  # keyword.KeywordSearcher of this shard (None: no keyword index)

    def release(self) -> None:
        if hasattr(self.index, "release"):  # free the GPU copy now, not at garbage collection
            self.index.release()


class IndexShard:
    """One shard of the index in one actor process.

    The plain class is wrapped by `ray.remote` (see `shard_actor_class`); its constructor loads
    the shard of the serving version from disk, so a restarted actor serves what was committed.
    """

    def __init__(self, index_dir: str, shard: int, omp_threads: int = 0, use_gpu: bool = False,
                 nice: int = 0, transport: str = "socket"):
        self.index_dir, self.shard, self.use_gpu, self.nice = index_dir, shard, use_gpu, nice
        self._thread = threading.local()  # per search thread: niceness applied
        self.gpu_note = "not requested (service.num_gpus = 0)"
        self._serving = self._load(str(serving_dir(index_dir)))
        self.manifest = self._serving.manifest
        if omp_threads <= 0:  # share this node's cores among the shards (Ray sets 1 otherwise)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            omp_threads = max(1, cores // self.manifest.num_shards)
        configure_faiss(omp_threads)
        self.omp_threads = omp_threads
        self._staged: _Loaded | None = None  # prepared, not yet committed
        self._previous: _Loaded | None = None  # the version before the last commit
        self.started = time.time()
        self.searches, self.queries, self.search_s = 0, 0, 0.0  # served so far (diagnostics)
        self.swaps, self.pinned = 0, 0  # commits; searches that asked for a non-serving version
        self._lock = threading.Lock()  # counters (searches run on several threads at once)
        self._swap_lock = threading.Lock()  # prepare / commit / abort
        self._server = None  # the direct search channel (wire.py), when transport = socket
        if transport == "socket":
            self._server = ShardServer(ray.util.get_node_ip_address(), self._search)

    def _load(self, path: str) -> _Loaded:
        manifest = load_manifest(path)
        index, ids = load_shard(path, self.shard, manifest)
        loaded = _Loaded(int(manifest.version), path, manifest, index, ids, enable_reconstruct(index))
        loaded.keyword = load_keyword(path, self.shard, manifest)  # BM25, swapped with the dense
        if self.use_gpu:  # FAISS on this actor's GPU share; candidates re-scored from the CPU copy
            from ratray.index.gpu import gpu_count, gpu_index_or_none

            n = gpu_count()
            gidx = gpu_index_or_none(index, device=self.shard % n) if n else None
            if gidx is None:
                self.gpu_note = ("no GPU visible to this actor (faiss-gpu and CUDA needed)" if not n
                                 else f"{type(index).__name__} has no GPU version: serving from the CPU")
            else:
                loaded.index, loaded.vectors = gidx, gidx.stored_vectors()
                self.gpu_note = f"GPU {gidx.device}"
        return loaded

    @ray.method(concurrency_group="search", num_returns=3)
    def search(self, queries: np.ndarray, k: int, version: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, int]:
        """queries (b, d) -> distances (b, k') float32, chunk ids (b, k') int64, version; k' =
        min(k, shard size). Three return objects, each small enough to travel inline in Ray's reply
        (one tuple would go through the object store: 1.7-3.4 ms more per call). `version` asks
        for a version this shard holds besides the serving one (prepared or previous); else the
        serving version answers (and says so). The socket channel (wire.py) calls `_search`."""
        return self._search(queries, k, version)

    def _pick(self, version: int | None) -> _Loaded:
        use = self._serving  # one read: a concurrent commit cannot change it under this search
        if version is not None and version != use.version:
            for other in (self._staged, self._previous):
                if other is not None and other.version == version:
                    return other
        return use

    def _search(self, queries: np.ndarray, k: int, version: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, int]:
        use = self._pick(version)
        q = _check_queries(queries, use.manifest.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        t0 = time.perf_counter()
        if self.nice and not getattr(self._thread, "niced", False):  # per thread on Linux; FAISS's
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            self._thread.niced = True  # OpenMP threads, started later by this one, inherit it
        configure_faiss(self.omp_threads)  # OpenMP thread counts are per calling thread
        D, I = search_topk(use.index, use.ids, q, k, use.manifest.metric, vectors=use.vectors,
                           exact_ties=use.exact_ties)
        with self._lock:
            self.searches, self.queries = self.searches + 1, self.queries + len(q)
            self.search_s += time.perf_counter() - t0
            self.pinned += use is not self._serving
        return D, I, use.version

    @ray.method(concurrency_group="search", num_returns=3)
    def keyword_search(self, texts: list[str], k: int, version: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, int]:
        """BM25 over this shard with the version's global statistics (keyword.py): texts (b,) ->
        scores (b, k') float32 descending, chunk ids (b, k') int64 (-1 past the matches),
        version; `version` as for `search`."""
        use = self._pick(version)
        if use.keyword is None:
            raise ValueError(f"index {use.path} has no keyword shards (manifest.extra['keyword']):"
                             " build it again with this code (ratray.build builds them)")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        S, I = use.keyword.search(list(texts), k)
        return S, I, use.version

    @ray.method(concurrency_group="swap")
    def prepare(self, path: str) -> int:
        """Load this shard of the index at `path` next to the serving one; returns its version.
        Versions move forward only (a resumed run serves its checkpoint's index republished under
        a higher version: refresh.RefreshService.restore)."""
        with self._swap_lock:
            new = self._load(path)
            cur = self._serving
            if new.version <= cur.version:
                raise ValueError(f"shard {self.shard}: version {new.version} at {path} is not newer "
                                 f"than the serving version {cur.version}")
            if (new.manifest.dim, new.manifest.metric, new.manifest.num_shards) != \
                    (cur.manifest.dim, cur.manifest.metric, cur.manifest.num_shards):
                raise ValueError(f"shard {self.shard}: index at {path} has dim/metric/shards "
                                 f"{new.manifest.dim}/{new.manifest.metric}/{new.manifest.num_shards}, "
                                 f"serving has {cur.manifest.dim}/{cur.manifest.metric}/"
                                 f"{cur.manifest.num_shards}")
            self._staged = new
            return new.version

    @ray.method(concurrency_group="swap")
    def commit(self, version: int) -> int:
        """Serve the prepared `version` from now on (idempotent); returns the serving version."""
        with self._swap_lock:
            if self._serving.version == version:
                return version  # already committed (a retried call, or a restart that loaded it)
            if self._staged is None or self._staged.version != version:
                raise ValueError(f"shard {self.shard}: version {version} was not prepared")
            if self._previous is not None:
                self._previous.release()
            self._previous, self._serving, self._staged = self._serving, self._staged, None
            self.manifest = self._serving.manifest
            self.swaps += 1
            return version

    @ray.method(concurrency_group="swap")
    def abort(self, version: int) -> None:
        with self._swap_lock:
            if self._staged is not None and self._staged.version == version:
                self._staged.release()
                self._staged = None

    @ray.method(concurrency_group="admin")
    def info(self) -> dict:
        cur = self._serving
        m = cur.manifest
        return {"shard": self.shard, "n_shards": m.num_shards, "version": cur.version,
                "staged_version": self._staged.version if self._staged else None,
                "previous_version": self._previous.version if self._previous else None,
                "size": int(cur.index.ntotal), "ntotal": m.ntotal, "factory": m.factory,
                "metric": m.metric, "dim": m.dim, "nprobe": m.nprobe, "ef_search": m.ef_search,
                "exact_ties": cur.exact_ties, "omp_threads": self.omp_threads, "nice": self.nice,
                "keyword_size": cur.keyword.size if cur.keyword is not None else None,
                "address": list(self._server.address) if self._server else None,
                "gpu": self.gpu_note,
                "index_dir": self.index_dir, "serving_dir": cur.path, "pid": os.getpid(),
                "started": self.started, "searches": self.searches, "queries": self.queries,
                "search_s": round(self.search_s, 4), "swaps": self.swaps, "pinned": self.pinned}

    @ray.method(concurrency_group="admin")
    def ping(self) -> int:
        return self.shard


@functools.lru_cache(maxsize=None)
def shard_actor_class(max_concurrency: int = 8):
    """`IndexShard` as a Ray actor class with `max_concurrency` search threads.

    Concurrency groups are fixed when the class is decorated (`.options()` cannot change them),
    hence one decorated class per size."""
    return ray.remote(concurrency_groups={"search": max_concurrency, "admin": 1, "swap": 1})(IndexShard)


# ---------------------------------------------------------------------------------------------
# the client


class ShardedIndex:
    """Client of the shard actors: fan-out search and exact merge, sync or async."""

    def __init__(self, actors: list, name: str, namespace: str, infos: list[dict],
                 timeout_s: float = ServiceConfig.timeout_s):
        self.actors, self.name, self.namespace = actors, name, namespace
        self.timeout_s = timeout_s  # the longest wait for any shard (fanout.py)
        info = infos[0]
        self.index_dir, self.metric, self.dim = info["index_dir"], info["metric"], info["dim"]
        self.ntotal = int(info["ntotal"])
        self._channels = Channels([inf.get("address") for inf in infos], self._address,
                                  timeout_s)  # wire.py

    def _address(self, i: int):
        """Shard i's channel address as its (possibly restarted) actor advertises it now."""
        return ray.get(self.actors[i].info.remote(), timeout=min(60, self.timeout_s)).get("address")

    @property
    def num_shards(self) -> int:
        return len(self.actors)

    def __repr__(self) -> str:
        return (f"ShardedIndex({self.namespace}/{self.name}, shards={self.num_shards}, "
                f"ntotal={self.ntotal}, dim={self.dim}, metric={self.metric})")

    @classmethod
    def launch(cls, index_dir: str, service: ServiceConfig | None = None) -> "ShardedIndex":
        """Create (or reuse, if already running) one named actor per shard; wait for all (up to
        `service.timeout_s`: then ShardTimeoutError names a shard that is not up, and why).

        Call from the driver: the actors are not detached and die with the job that made them.
        """
        svc = service or ServiceConfig()
        index_dir = os.path.abspath(index_dir)
        serving = serving_dir(index_dir)
        manifest = load_manifest(serving)  # fail here, clearly, not inside N actors
        for s in manifest.shards:
            for key in ("file", "ids"):
                if not os.path.isfile(os.path.join(serving, s[key])):
                    raise FileNotFoundError(f"index {serving}: missing shard file {s[key]}")
        actor_cls = shard_actor_class(svc.max_concurrency)
        actors = [actor_cls.options(name=actor_name(svc.name, i), namespace=svc.namespace,
                                    get_if_exists=True, lifetime=None, num_cpus=svc.num_cpus,
                                    resources=dict(svc.resources) or None,
                                    num_gpus=svc.num_gpus or None,
                                    max_restarts=-1, max_task_retries=-1)
                  .remote(index_dir, i, svc.omp_threads, svc.num_gpus > 0, svc.nice, svc.transport)
                  for i in range(manifest.num_shards)]
        infos = wait_infos(actors, svc.name, svc.namespace, svc.timeout_s, "start")
        stale = [inf["shard"] for inf in infos if inf["index_dir"] != index_dir]
        if stale:
            raise RuntimeError(f"actors {svc.namespace}/{svc.name}-shard-{stale} already serve "
                               f"another index ({infos[stale[0]]['index_dir']}): shut them down "
                               "or pick another service.name")
        return cls(actors, svc.name, svc.namespace, infos, svc.timeout_s)

    @classmethod
    def connect(cls, name: str = "index", namespace: str = "ratray", timeout: float = 60,
                search_timeout: float = ServiceConfig.timeout_s) -> "ShardedIndex":
        """Find running shard actors by name, e.g. from a Ray Train worker; waits up to
        `timeout` seconds for shard 0 to appear, learns the shard count from its `info()`.
        `search_timeout`: the client's `timeout_s` (the job's `service.timeout_s`)."""
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
        info = wait_infos([first], name, namespace, timeout, "answer", "connect's timeout")[0]
        actors = [first]
        for i in range(1, info["n_shards"]):
            try:
                actors.append(ray.get_actor(actor_name(name, i), namespace=namespace))
            except ValueError:
                raise RuntimeError(f"index actor {actor_name(name, i)!r} missing in namespace "
                                   f"{namespace!r} (shard 0 says there are {info['n_shards']})"
                                   ) from None
        infos = wait_infos(actors, name, namespace, timeout, "answer", "connect's timeout")
        return cls(actors, name, namespace, infos, search_timeout)

    def search_async(self, queries: np.ndarray, k: int) -> SearchFuture:
        """Start a search on every shard at once; returns immediately."""
        q = _check_queries(queries, self.dim)  # (b, d)
        if not 0 < k <= self.ntotal:
            raise ValueError(f"k={k} is out of range: the index holds {self.ntotal} vectors")
        return SearchFuture(self, q, k)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Exact merged top-k over all shards: distances (b, k), chunk ids (b, k), version."""
        return self.search_async(queries, k).result()

    def keyword_search(self, texts: list[str], k: int, version: int | None = None
                       ) -> SearchResult:
        """Exact merged BM25 top-k over all shards (keyword.py): scores (b, k) descending, chunk
        ids (b, k) (-1 where fewer chunks share a token with the query), version. Plain Ray
        calls; every shard answers for one version (a lagging shard is re-asked for the newest)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not 0 < k <= self.ntotal:
            raise ValueError(f"k={k} is out of range: the index holds {self.ntotal} chunks")
        ask = list(range(self.num_shards))
        parts: list = [None] * self.num_shards
        for _ in range(3):  # a swap half-way: the lagging shards hold the newer version prepared
            if not ask:
                break
            refs = [self.actors[i].keyword_search.remote(texts, k, version) for i in ask]
            try:
                got = ray.get([r for three in refs for r in three], timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise ShardTimeoutError(f"keyword search: shards {ask} of {self.namespace}/"
                                        f"{self.name} did not all answer within {self.timeout_s:g} "
                                        "s (service.timeout_s)") from None
            for j, i in enumerate(ask):
                parts[i] = got[3 * j: 3 * j + 3]  # scores, chunk ids, version
            newest = max(p[2] for p in parts)
            ask = [i for i, p in enumerate(parts) if p[2] != newest]
            version = newest
        if ask:
            raise ShardVersionError(f"keyword search: shards answered from versions "
                                    f"{sorted({int(p[2]) for p in parts})}")
        S, I = merge_topk([p[0] for p in parts], [p[1] for p in parts], k, "ip")
        return SearchResult(S, I, int(version))

    def hybrid_search(self, queries: np.ndarray, texts: list[str], k: int, cfg) -> SearchResult:
        """What a job retrieves under `cfg` (its IndexConfig): `index.hybrid` off: the dense
        top-k; rrf | weighted: the dense and BM25 top-`hybrid_depth` lists (one version) fused
        (keyword.fuse), fused scores (b, k) descending and chunk ids (b, k)."""
        if cfg.hybrid == "off":
            return self.search(queries, k)
        depth = min(max(k, cfg.hybrid_depth), self.ntotal)
        pending = self.search_async(queries, depth)  # the dense search runs while BM25 does
        kw = self.keyword_search(texts, depth)
        dense = pending.result()
        if kw.version != dense.version:  # a swap between the two: BM25 of the dense version
            kw = self.keyword_search(texts, depth, version=dense.version)
        S, I = fuse(dense.distances, dense.ids, self.metric, kw.distances, kw.ids, k, cfg)
        return SearchResult(S, I, dense.version)

    def info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])

    def version(self) -> int:
        """The serving version (of shard 0; after a completed swap all shards agree)."""
        return int(ray.get(self.actors[0].info.remote())["version"])

    def swap(self, new_dir: str | Path, timeout: float = 600) -> int:
        """Hot-swap every shard to the index at `new_dir` (inside this index's root); returns its
        version. Two-phase (prepare all, rewrite CURRENT, commit all): searches go on throughout
        and never mix versions (see the module docstring). A failed prepare aborts everywhere,
        leaves the serving version as it was and raises."""
        new_dir = Path(new_dir).resolve()
        manifest = load_manifest(new_dir)
        if manifest.num_shards != self.num_shards:
            raise ValueError(f"{new_dir} has {manifest.num_shards} shards, the service runs "
                             f"{self.num_shards}")
        v = int(manifest.version)
        try:
            got = ray.get([a.prepare.remote(str(new_dir)) for a in self.actors],
                          timeout=timeout)
        except BaseException:
            ray.get([a.abort.remote(v) for a in self.actors], timeout=timeout)
            raise
        assert set(got) == {v}, got
        write_current(self.index_dir, new_dir)
        ray.get([a.commit.remote(v) for a in self.actors], timeout=timeout)
        return v

    def shutdown(self) -> None:
        """Kill the shard actors (for good: no restart)."""
        self._channels.close()
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []

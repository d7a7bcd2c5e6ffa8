"""One search in flight across the shard actors (`SearchFuture`), and its deadline.

Each shard is asked over its socket channel (wire.py), else — or when the channel breaks — by a
Ray call Ray retries. Every wait is bounded (`service.timeout_s`): a shard that cannot be placed
(its node is gone, it asks for a resource no node has), or is stuck, fails the search with
`ShardTimeoutError` naming the shard, its actor and what Ray says it waits for, instead of
hanging a training step until the job's deadline.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import ray

from ratray.index.search import SearchResult, merge_topk

INLINE_QUERY_BYTES = 100_000  # Ray passes arguments below its 100 KiB inline limit by value
WAITING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")  # Ray's not-yet-placed states


class ShardVersionError(RuntimeError):
    """Shards answered from different index versions (a swap is half-way; retry or relaunch)."""


class ShardTimeoutError(TimeoutError):
    """A shard did not answer within `service.timeout_s`: the message names it and says why."""


def why_waiting(actor) -> str:
    """What Ray says about `actor`: not placed (and which resource no node has), dead, or alive."""
    try:  # the GCS actor table (Ray's state API needs the dashboard, not always running)
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        data = gcs_pb2.ActorTableData.FromString(
            state._connect_and_get_accessor().get_actor_info(actor._actor_id))
        st = gcs_pb2.ActorTableData.ActorState.Name(data.state)
        need = {k: v for k, v in data.required_resources.items() if not k.startswith("node:")}
        nodes = state.total_resources_per_node().values()
    except Exception as e:  # another Ray layout: the timeout still fails, less precisely
        return f"Ray did not say why ({type(e).__name__})"
    if st in WAITING:
        if not need:
            return f"it is {st}: Ray is still starting its process (a slow or overloaded node)"
        wants = ", ".join(f"{k}={v:g}" for k, v in sorted(need.items()))
        lacking = [k for k, v in sorted(need.items()) if not any(n.get(k, 0) >= v for n in nodes)]
        where = (f"no node of the cluster has {', '.join(lacking)}" if lacking
                 else "no node has them free now")
        return f"it is {st} (not placed): it needs {wants} and {where}"
    if st == "DEAD":
        cause = " ".join(str(data.death_cause).split())[:200]  # a protobuf: one line
        return f"it is DEAD: {cause or 'no cause recorded'}"
    return f"it is {st} (pid {data.pid}) but did not answer: busy or stuck"


def actor_name(name: str, i: int) -> str:
    return f"{name}-shard-{i}"


def not_answering(actor, i: int, name: str, namespace: str, seconds: float,
                  doing: str = "answer the search", limit: str = "service.timeout_s"
                  ) -> ShardTimeoutError:
    """The error for shard `i` (its `actor`, of the service `name`) after waiting `seconds`."""
    return ShardTimeoutError(
        f"index shard {i} (actor {namespace}/{actor_name(name, i)}) did not {doing} within "
        f"{seconds:g} s ({limit}): {why_waiting(actor)}")


def wait_infos(actors: list, name: str, namespace: str, timeout: float, doing: str,
               limit: str = "service.timeout_s") -> list[dict]:
    """Every shard actor's `info()`, or ShardTimeoutError for the first not up within `timeout`."""
    refs = [a.info.remote() for a in actors]
    up, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if len(up) < len(refs):
        late = next(i for i, r in enumerate(refs) if r not in up)
        raise not_answering(actors[late], late, name, namespace, timeout, doing, limit)
    return ray.get(refs)


class SearchFuture:
    """An in-flight fan-out (`.result(timeout)`, `.done()`, `await fut`): a training loop asks for
    the next batch's neighbours while the current batch computes."""

    def __init__(self, index, queries: np.ndarray, k: int):
        self._index, self._q, self._k = index, queries, k
        self._qref = None  # the queries in the object store, once a Ray call needs them
        self._asked: list = [self._ask(i, None) for i in range(index.num_shards)]
        self._result: SearchResult | None = None
        self.reasked = 0  # shards re-asked because the fan-out straddled a swap

    def _ray_queries(self):
        if self._qref is None:  # a big batch goes into the object store once, for every shard
            self._qref = ray.put(self._q) if self._q.nbytes >= INLINE_QUERY_BYTES else self._q
        return self._qref

    def _ask(self, i: int, version: int | None):
        """("wire", connection, seq, version) or ("ray", [D, I, version refs], version)."""
        conn = self._index._channels.get(i)
        if conn is not None:
            try:
                return ("wire", conn, conn.send(self._q, self._k, version), version)
            except ConnectionError:
                self._index._channels.drop(i, conn)
        return self._ask_ray(i, version)

    def _ask_ray(self, i: int, version: int | None):
        refs = self._index.actors[i].search.remote(self._ray_queries(), self._k, version)
        return "ray", refs, version

    def _answer(self, i: int, asked, deadline: float, timeout: float) -> tuple:
        try:
            if asked[0] == "wire":
                try:
                    return asked[1].reply(asked[2], timeout=max(0.0, deadline - time.monotonic()))
                except ConnectionError:  # the actor died or restarted: ask it through Ray
                    self._index._channels.drop(i, asked[1])
                    asked = self._ask_ray(i, asked[3])
            return tuple(ray.get(asked[1], timeout=max(0.0, deadline - time.monotonic())))
        except (TimeoutError, ray.exceptions.GetTimeoutError):  # the channel dropped itself
            index = self._index
            raise not_answering(index.actors[i], i, index.name, index.namespace, timeout) from None

    def done(self) -> bool:
        return self._result is not None or all(
            a[1].ready() if a[0] == "wire"
            else len(ray.wait(a[1], num_returns=3, timeout=0, fetch_local=False)[0]) == 3
            for a in self._asked)

    def result(self, timeout: float | None = None) -> SearchResult:
        """The merged answer; `timeout` (default: the client's `timeout_s`) bounds the whole wait."""
        if self._result is None:
            timeout = self._index.timeout_s if timeout is None else timeout
            deadline = time.monotonic() + timeout
            parts = [self._answer(i, a, deadline, timeout) for i, a in enumerate(self._asked)]
            newest = max(int(p[2]) for p in parts)
            lag = [i for i, p in enumerate(parts) if int(p[2]) != newest]
            if lag:  # the fan-out straddled a commit: the lagging shards hold `newest` prepared
                self.reasked += len(lag)
                redo = [self._ask(i, newest) for i in lag]
                for i, a in zip(lag, redo):
                    parts[i] = self._answer(i, a, deadline, timeout)
            versions = sorted({int(p[2]) for p in parts})
            if len(versions) != 1:
                raise ShardVersionError(f"shards answered from different index versions {versions}")
            D, I = merge_topk([p[0] for p in parts], [p[1] for p in parts], self._k,
                              self._index.metric)
            self._result, self._asked = SearchResult(D, I, versions[0]), []
        return self._result

    def __await__(self):
        async def wait() -> SearchResult:
            if self._result is None:
                await asyncio.get_running_loop().run_in_executor(None, self.result)
            return self._result
        return wait().__await__()

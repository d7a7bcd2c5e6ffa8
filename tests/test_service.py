"""The index service: real shard actors on the session's local Ray.

Exact merged top-k through actors, restart of a killed shard, async search, lookup by name from
another Ray task (as a Ray Train worker does), zero CPU reservations, version mismatch.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from ratray.config import IndexConfig, ServiceConfig
from ratray.index.build import build_index
from ratray.index.service import (ShardedIndex, ShardTimeoutError, ShardVersionError, actor_name,
                                  shard_actor_class)
from tests.test_index import brute_force, chunk_ids, mixture

NS = "ratray-svc-tests"


@pytest.fixture(scope="module")
def data():
    x = mixture(6_120, seed=7)
    return x[:6_000], chunk_ids(6_000), x[6_000:]  # database, ids, held-out queries


@pytest.fixture(scope="module")
def flat_l2(ray_session, data, tmp_path_factory):
    """A 3-shard Flat index served by 3 actors for the whole module."""
    x, ids, _ = data
    out = tmp_path_factory.mktemp("svc") / "flat-l2"
    build_index(x, ids, out, IndexConfig(factory="Flat", shards=3, metric="l2"), "test")
    index = ShardedIndex.launch(str(out), ServiceConfig(name="flat-l2", namespace=NS))
    yield index
    index.shutdown()


def test_sharded_search_equals_brute_force_l2(flat_l2, data):
    x, ids, q = data
    assert flat_l2.num_shards == 3 and flat_l2.ntotal == len(x)
    res = flat_l2.search(q, 10)
    D_ref, I_ref = brute_force(x, ids, q, 10, "l2")
    assert res.ids.shape == (len(q), 10) and res.ids.dtype == np.int64 and res.version == 1
    assert np.array_equal(res.ids, I_ref)
    np.testing.assert_allclose(res.distances, D_ref, rtol=1e-5, atol=1e-6)


def test_sharded_search_equals_brute_force_ip(ray_session, data, tmp_path):
    x, ids, q = data
    build_index(x, ids, tmp_path / "ip", IndexConfig(factory="Flat", shards=3, metric="ip"), "t")
    index = ShardedIndex.launch(str(tmp_path / "ip"), ServiceConfig(name="flat-ip", namespace=NS))
    try:
        res = index.search(q, 10)
    finally:
        index.shutdown()
    D_ref, I_ref = brute_force(x, ids, q, 10, "ip")
    assert np.array_equal(res.ids, I_ref)
    np.testing.assert_allclose(res.distances, D_ref, rtol=1e-5, atol=1e-6)
    assert (np.diff(res.distances, axis=1) <= 0).all()  # inner products: best (largest) first


def test_actors_reserve_no_cpu(flat_l2, ray_session):
    ray = ray_session
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_num_cpus_reaches_the_actors(ray_session, data, tmp_path):
    """The fraction in ServiceConfig is what the actors hold (so 0 really means 0)."""
    ray = ray_session
    x, ids, _ = data
    build_index(x[:500], ids[:500], tmp_path / "i", IndexConfig(factory="Flat", shards=2), "t")
    before = ray.available_resources().get("CPU", 0)
    index = ShardedIndex.launch(str(tmp_path / "i"),
                                ServiceConfig(name="quarter", namespace=NS, num_cpus=0.25))
    try:
        deadline = time.monotonic() + 10  # the resource view is eventually consistent
        while (ray.available_resources().get("CPU", 0) != before - 0.5
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert ray.available_resources().get("CPU", 0) == pytest.approx(before - 0.5)
    finally:
        index.shutdown()


def test_niced_shards_search_at_lower_priority_and_answer_the_same(ray_session, data, tmp_path):
    """service.nice lowers the priority of the threads that search (so co-located training runs
    first); the answers do not change."""
    x, ids, q = data
    build_index(x[:500], ids[:500], tmp_path / "i", IndexConfig(factory="Flat", shards=2), "t")
    plain = ShardedIndex.launch(str(tmp_path / "i"), ServiceConfig(name="plain", namespace=NS))
    niced = ShardedIndex.launch(str(tmp_path / "i"), ServiceConfig(name="niced", namespace=NS, nice=7))
    try:
        want, got = plain.search(q[:16], 5), niced.search(q[:16], 5)
        assert np.array_equal(want.ids, got.ids)
        for inf in niced.info():
            assert inf["nice"] == 7
            nices = set()
            for stat in Path(f"/proc/{inf['pid']}/task").glob("*/stat"):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                nices.add(int(fields[16]))  # field 19 of stat: nice
            assert 7 in nices and 0 in nices  # the search thread niced, the actor's others not
        assert {inf["nice"] for inf in plain.info()} == {0}
    finally:
        plain.shutdown()
        niced.shutdown()


def test_socket_channels_and_ray_calls_give_the_same_answers(flat_l2, ray_session, data, tmp_path):
    """service.transport=socket (the default) searches over one TCP channel per shard, opened on
    the actor's node address; transport=ray makes every search a Ray actor call. Same answers."""
    x, ids, q = data
    assert all(inf["address"] is not None for inf in flat_l2.info())
    flat_l2.search(q[:4], 3)
    assert all(c is not None and c.broken is None for c in flat_l2._channels.conns)
    build_index(x, ids, tmp_path / "i", IndexConfig(factory="Flat", shards=3), "t")
    via_ray = ShardedIndex.launch(str(tmp_path / "i"), ServiceConfig(name="via-ray", namespace=NS,
                                                                     transport="ray"))
    try:
        assert all(inf["address"] is None for inf in via_ray.info())
        for batch in (q[:1], q[:8], q):
            a, b = flat_l2.search(batch, 10), via_ray.search(batch, 10)
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.distances, b.distances)
        assert via_ray._channels.conns == [None, None, None]
    finally:
        via_ray.shutdown()


def test_a_client_handed_to_a_task_opens_its_own_channels(flat_l2, ray_session, data):
    """A pickled ShardedIndex leaves its connections behind; the task opens its own."""
    ray = ray_session
    _, _, q = data
    want = flat_l2.search(q[:8], 5)

    @ray.remote(num_cpus=0)
    def search_there(index, queries):
        res = index.search(queries, 5)
        return res.ids, sum(c is not None for c in index._channels.conns)

    ids, opened = ray.get(search_there.remote(flat_l2, q[:8]))
    assert np.array_equal(ids, want.ids) and opened == 3


def test_bad_queries_and_k_are_clear_errors(flat_l2, data, ray_session):
    _, _, q = data
    with pytest.raises(ValueError, match="shape"):
        flat_l2.search(q[:, :100], 10)
    with pytest.raises(ValueError, match="holds 6000"):
        flat_l2.search(q, 6001)
    with pytest.raises(ValueError, match="shape"):  # the actor checks too
        ray_session.get(flat_l2.actors[0].search.remote(q[:, :100], 10))


def test_killed_shard_comes_back_with_its_shard(flat_l2, data, ray_session):
    ray = ray_session
    _, _, q = data
    before = flat_l2.search(q, 10)
    pid = flat_l2.info()[1]["pid"]
    ray.kill(flat_l2.actors[1], no_restart=False)
    after = flat_l2.search(q, 10)  # waits for the restart (max_task_retries=-1)
    assert np.array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.distances, before.distances)
    info = flat_l2.info()[1]
    assert info["pid"] != pid and info["size"] == 2_000 and info["shard"] == 1
    # the old channel breaks (answered through Ray meanwhile); the restarted actor opened a new
    # one, which the client learns from it and searches over from then on
    for _ in range(2):
        again = flat_l2.search(q, 10)
        assert np.array_equal(again.ids, before.ids)
    conn = flat_l2._channels.conns[1]
    assert conn is not None and conn.broken is None and list(conn.address) == info["address"]


def test_search_async_returns_before_the_answer(flat_l2, data):
    x, _, _ = data
    q = np.repeat(x[:1_000], 2, axis=0)  # a big batch: the service needs a while
    t0 = time.perf_counter()
    fut = flat_l2.search_async(q, 10)
    submit_s = time.perf_counter() - t0
    assert not fut.done()  # returned before the result existed
    info = flat_l2.info()  # admin calls do not queue behind searches
    assert len(info) == 3 and not fut.done()
    res = fut.result(timeout=60)
    total_s = time.perf_counter() - t0
    assert fut.done() and submit_s < total_s / 3

    async def consumer():
        return await flat_l2.search_async(q, 10)

    res_await = asyncio.run(consumer())
    sync = flat_l2.search(q, 10)
    for r in (res, res_await):
        assert np.array_equal(r.ids, sync.ids) and np.array_equal(r.distances, sync.distances)


def test_connect_by_name_from_another_task(flat_l2, data, ray_session):
    """A Ray task (standing in for a Ray Train worker) finds the actors by name + namespace."""
    ray = ray_session
    _, _, q = data

    @ray.remote(num_cpus=1)
    def worker(queries):
        from ratray.index.service import ShardedIndex
        index = ShardedIndex.connect("flat-l2", namespace=NS)
        return index.num_shards, index.search(queries, 10).ids

    n, ids = ray.get(worker.remote(q[:50]), timeout=120)
    assert n == 3 and np.array_equal(ids, flat_l2.search(q[:50], 10).ids)
    with pytest.raises(RuntimeError, match="no index actor"):
        ShardedIndex.connect("nobody", namespace=NS, timeout=0)


def test_version_mismatch_is_detected(ray_session, data, tmp_path):
    ray = ray_session
    x, ids, q = data
    out = tmp_path / "versioned"
    cfg = IndexConfig(factory="Flat", shards=2)
    build_index(x[:400], ids[:400], out, cfg, "t", version=1)
    index = ShardedIndex.launch(str(out), ServiceConfig(name="versioned", namespace=NS))
    try:
        assert index.search(q[:4], 5).version == 1
        build_index(x[:400], ids[:400], out, cfg, "t", version=2)  # swapped in on disk
        shard1 = ray.get_actor(actor_name("versioned", 1), namespace=NS)
        pid = ray.get(shard1.info.remote())["pid"]
        ray.kill(shard1, no_restart=False)
        deadline = time.monotonic() + 60  # ray.kill is asynchronous: wait for the restart
        while ray.get(shard1.info.remote())["pid"] == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(ShardVersionError, match=r"\[1, 2\]"):
            index.search(q[:4], 5)  # shard 1 restarted on version 2, shard 0 still on 1
    finally:
        index.shutdown()


def test_shard_asked_for_a_gpu_serves_from_the_cpu_and_says_why_when_there_is_none(data, tmp_path):
    from ratray.index.gpu import gpu_count
    from ratray.index.service import IndexShard

    if gpu_count() > 0:
        pytest.skip("a GPU is present: bench/gpu_check.py covers the GPU path")
    x, ids, q = data
    build_index(x[:500], ids[:500], tmp_path / "g", IndexConfig(factory="Flat", shards=1), "t")
    shard = IndexShard(str(tmp_path / "g"), 0, omp_threads=1, use_gpu=True)  # the plain class
    D, I, v = shard.search(q[:5], 4)
    assert np.array_equal(I, brute_force(x[:500], ids[:500], q[:5], 4, "l2")[1]) and v == 1
    assert "no GPU" in shard.info()["gpu"]


# ---------------------------------------------------------------------------------------------
# every wait for a shard is bounded (service.timeout_s) and says which shard and why


@pytest.fixture
def two_shards(ray_session, data, tmp_path):
    x, ids, _ = data
    build_index(x[:400], ids[:400], tmp_path / "i", IndexConfig(factory="Flat", shards=2), "t")
    return str(tmp_path / "i")


@pytest.mark.parametrize("transport", ["socket", "ray"])
def test_a_shard_that_cannot_be_placed_fails_the_search_within_the_timeout_naming_it(
        ray_session, data, two_shards, transport):
    """Shard 1's actor is gone and what replaces it asks for a resource no node has (its node
    left the cluster): the search fails after `timeout_s` naming the shard and the resource, over
    the socket channel (whose peer died: the Ray-call fallback waits) and over Ray calls."""
    ray = ray_session
    name = f"unplaceable-{transport}"
    index = ShardedIndex.launch(two_shards, ServiceConfig(name=name, namespace=NS, transport=transport))
    _, _, q = data
    try:
        index.search(q[:4], 5)  # channels open (socket)
        pid = index.info()[1]["pid"]
        ray.kill(index.actors[1], no_restart=True)
        deadline = time.monotonic() + 30  # ray.kill is asynchronous: wait for the process to end
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        index.actors[1] = shard_actor_class(8).options(
            namespace=NS, num_cpus=0, resources={"no_such_node": 1}, max_restarts=-1,
            max_task_retries=-1).remote(two_shards, 1, 0, False, 0, transport)
        index.timeout_s = 2.0
        t0 = time.monotonic()
        with pytest.raises(ShardTimeoutError) as e:
            index.search_async(q[:4], 5).result()
        waited = time.monotonic() - t0
        msg = str(e.value)
        assert f"index shard 1 (actor {NS}/{actor_name(name, 1)}) did not answer the search " \
               "within 2 s" in msg, msg
        assert "PENDING_CREATION" in msg and "no node of the cluster has no_such_node" in msg, msg
        assert waited < 12  # the socket path also re-asks shard 1 for its address (<= timeout_s)
    finally:
        ray.kill(index.actors[1], no_restart=True)
        index.shutdown()


def test_a_stuck_shard_fails_the_search_over_its_socket_within_the_timeout(ray_session, data,
                                                                            two_shards):
    """A shard process that stops answering (SIGSTOP: a hung node) while its channel stays open."""
    _, _, q = data
    index = ShardedIndex.launch(two_shards, ServiceConfig(name="stuck", namespace=NS))
    pid = index.info()[1]["pid"]
    try:
        want = index.search(q[:4], 5)  # warm (a cold first search may take seconds on a busy node)
        index.timeout_s = 2.0
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ShardTimeoutError, match=rf"index shard 1 \(actor {NS}/stuck-shard-1\) "
                                                    rf"did not answer the search within 2 s .*ALIVE \(pid {pid}\)"):
            index.search(q[:4], 5)
        assert time.monotonic() - t0 < 10
        os.kill(pid, signal.SIGCONT)
        index.timeout_s = 60.0
        assert np.array_equal(index.search(q[:4], 5).ids, want.ids)  # a new channel, same answer
    finally:
        os.kill(pid, signal.SIGCONT)
        index.shutdown()


def test_launch_and_connect_name_the_shard_that_cannot_be_placed_and_the_resource(ray_session,
                                                                                   two_shards):
    ray = ray_session
    svc = ServiceConfig(name="noplace", namespace=NS, resources={"no_such_node": 1}, timeout_s=2)
    try:
        with pytest.raises(ShardTimeoutError, match=rf"index shard 0 \(actor {NS}/noplace-shard-0\) "
                                                    r"did not start within 2 s .*no_such_node"):
            ShardedIndex.launch(two_shards, svc)
        with pytest.raises(ShardTimeoutError, match=r"shard 0 .* did not answer within 1 s.*no_such_node"):
            ShardedIndex.connect("noplace", namespace=NS, timeout=1)
    finally:
        for i in range(2):
            ray.kill(ray.get_actor(actor_name("noplace", i), namespace=NS), no_restart=True)

"""Hot swaps and the embedding-refresh service, on real shard actors and a real chunk store.

The embedder here is a bag of token embeddings (mean of the rows of a weight matrix for the
block's tokens): a real, deterministic embedder whose output changes with its weights, so each
index version has its own exact answers to check against.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict

import numpy as np
import pytest

from ratray.config import IndexConfig, RefreshConfig, ServiceConfig
from ratray.data.store import ChunkStore
from ratray.index.build import build_index
from ratray.index.refresh import embed_corpus, launch_refresh_service, put_weights
from ratray.index.service import ShardedIndex
from ratray.index.store import load_manifest, serving_dir, version_dir, write_current
from tests.test_index import brute_force, chunk_ids, mixture

NS = "ratray-refresh-tests"


class BagOfEmbeddings:
    """tokens (n t) -> mean of weights["emb"][token] over non-pad tokens, (n p) float32."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, weights: dict, tokens: np.ndarray) -> np.ndarray:
        emb = np.asarray(weights["emb"], dtype=np.float32)  # (V p); KeyError if absent
        keep = (tokens != self.pad_id)[..., None]
        return (emb[tokens] * keep).sum(1) / np.maximum(keep.sum(1), 1)


def _weights(vocab: int, seed: int, p: int = 16) -> dict:
    return {"emb": np.random.default_rng(seed).standard_normal((vocab, p)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# hot swap on the shard actors


@pytest.fixture()
def versioned(ray_session, tmp_path):
    """An index root with three versions (different vectors over the same ids), serving v1."""
    q = mixture(64, seed=11)
    ids = chunk_ids(3_000)
    vecs = {v: mixture(3_000, seed=20 + v) for v in (1, 2, 3)}
    cfg = IndexConfig(factory="Flat", shards=2, metric="ip")
    for v, x in vecs.items():
        build_index(x, ids, version_dir(tmp_path, v), cfg, "t", version=v)
    write_current(tmp_path, version_dir(tmp_path, 1))
    index = ShardedIndex.launch(str(tmp_path), ServiceConfig(name=f"swap-{tmp_path.name}", namespace=NS))
    yield index, tmp_path, vecs, ids, q
    index.shutdown()


def test_hot_swap_under_search_load_has_no_failures_and_versions_only_move_forward(versioned):
    index, root, vecs, ids, q = versioned
    exact = {v: brute_force(x, ids, q, 10, "ip")[1] for v, x in vecs.items()}
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                r = index.search(q, 10)
                assert np.array_equal(r.ids, exact[r.version]), f"answer is not version {r.version}'s"
                seen.append(r.version)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert index.swap(version_dir(root, 2)) == 2
    time.sleep(0.3)
    assert index.swap(version_dir(root, 3)) == 3
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert {1, 3} <= set(seen) and len(seen) > 10
    # per thread order is interleaved in `seen`; the service-wide state only moved forward
    assert [i["version"] for i in index.info()] == [3, 3]
    assert serving_dir(root) == version_dir(root, 3)
    with pytest.raises(Exception, match="not newer"):
        index.swap(version_dir(root, 2))  # backwards is refused ...
    assert index.version() == 3  # ... and changes nothing


def test_fan_out_that_straddles_a_commit_is_served_by_one_version(versioned):
    index, root, vecs, ids, q = versioned
    import ray

    exact2 = brute_force(vecs[2], ids, q, 10, "ip")[1]
    v2 = str(version_dir(root, 2))
    assert ray.get([a.prepare.remote(v2) for a in index.actors]) == [2, 2]
    ray.get(index.actors[0].commit.remote(2))  # shard 0 serves v2, shard 1 still v1
    fut = index.search_async(q, 10)
    r = fut.result()
    assert r.version == 2 and fut.reasked == 1
    assert np.array_equal(r.ids, exact2)
    ray.get(index.actors[1].commit.remote(2))
    assert [i["version"] for i in index.info()] == [2, 2]


def test_failed_prepare_aborts_and_leaves_the_old_version_serving(versioned):
    index, root, vecs, ids, q = versioned
    (version_dir(root, 2) / "shard_1.faiss").write_bytes(b"not an index")
    with pytest.raises(Exception):
        index.swap(version_dir(root, 2))
    infos = index.info()
    assert [i["version"] for i in infos] == [1, 1] and all(i["staged_version"] is None for i in infos)
    assert serving_dir(root) == version_dir(root, 1)
    assert np.array_equal(index.search(q, 10).ids, brute_force(vecs[1], ids, q, 10, "ip")[1])


# ---------------------------------------------------------------------------------------------
# the refresh service


@pytest.fixture()
def refresh(small_workdir, tmp_path):
    """A refresh service over the small chunk store, its v1 built, its shard actors launched."""
    import ray

    wd, _, summary = small_workdir
    store = ChunkStore.open(summary["chunk_store"]["path"])
    name = f"rf-{tmp_path.name}"[:40]
    svc_cfg = ServiceConfig(name=name, namespace=NS)
    icfg = IndexConfig(factory="Flat", shards=2, metric="ip")
    emb = BagOfEmbeddings(store.tokenizer.pad_id)
    service = launch_refresh_service(tmp_path / "index", store, icfg, svc_cfg,
                                     RefreshConfig(num_workers=2, keep_versions=2), emb)
    first = ray.get(service.initial.remote(put_weights(_weights(store.tokenizer.vocab_size, 0)), 0))
    index = ShardedIndex.launch(str(tmp_path / "index"), svc_cfg)
    yield service, index, store, emb, tmp_path / "index", first
    index.shutdown()
    ray.kill(service)


def _exact(store, emb, weights, queries, k):
    ids = np.arange(len(store))
    vecs = emb(weights, store.tokens(ids))
    return brute_force(vecs, ids, queries, k, "ip")[1]


def test_refresh_service_swaps_in_a_version_built_from_the_new_weights(refresh):
    import ray

    service, index, store, emb, root, first = refresh
    vocab = store.tokenizer.vocab_size
    assert first["version"] == 1 and not first["reused"]
    q = mixture(16, seed=3)[:, :16].copy()
    assert np.array_equal(index.search(q, 5).ids, _exact(store, emb, _weights(vocab, 0), q, 5))

    w1 = _weights(vocab, 1)
    assert ray.get(service.request.remote(put_weights(w1), 40))["started"]
    st = ray.get(service.wait_idle.remote(120))
    assert st["completed"] == 2 and st["failed"] == 0 and st["serving_version"] == 2
    assert st["serving_step"] == 40 and st["version_steps"] == {"1": 0, "2": 40}
    rec = st["history"][-1]
    assert rec["blocks"] == len(store) and rec["blocks_per_s"] > 0 and rec["embed_s"] > 0
    r = index.search(q, 5)
    assert r.version == 2 and np.array_equal(r.ids, _exact(store, emb, w1, q, 5))

    # a request while one runs waits; a newer one replaces it (coalesced); the newest wins
    ray.get([service.request.remote(put_weights(_weights(vocab, s)), s) for s in (50, 60, 70)])
    st = ray.get(service.wait_idle.remote(180))
    assert st["requested"] == 4 and st["coalesced"] >= 1 and st["failed"] == 0
    assert st["serving_step"] == 70 and st["serving_version"] == st["completed"] + 0
    assert np.array_equal(index.search(q, 5).ids, _exact(store, emb, _weights(vocab, 70), q, 5))
    kept = sorted(p.name for p in (root / "versions").iterdir())
    assert len(kept) == 2 and kept[-1] == f"v{st['serving_version']:06d}"  # keep_versions=2


def test_failed_refresh_leaves_the_old_version_serving_and_the_next_one_retries(refresh):
    import ray

    service, index, store, emb, root, _ = refresh
    vocab = store.tokenizer.vocab_size
    q = mixture(8, seed=4)[:, :16].copy()
    ray.get(service.request.remote(put_weights({"wrong": np.zeros(3)}), 10))  # the embedder raises
    st = ray.get(service.wait_idle.remote(120))
    assert st["failed"] == 1 and st["serving_version"] == 1 and "KeyError" in st["last_error"]
    assert index.search(q, 5).version == 1
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000001"]
    ray.get(service.request.remote(put_weights(_weights(vocab, 2)), 20))  # the next interval
    st = ray.get(service.wait_idle.remote(120))
    assert st["serving_version"] == 2 and st["last_error"] is None and st["failed"] == 1
    assert index.search(q, 5).version == 2


def test_restore_serves_the_checkpointed_index_again_under_a_higher_version(refresh):
    import ray

    service, index, store, emb, root, _ = refresh
    vocab = store.tokenizer.vocab_size
    for s in (10, 20):
        ray.get(service.request.remote(put_weights(_weights(vocab, s)), s))
        ray.get(service.wait_idle.remote(120))
    assert index.version() == 3
    out = ray.get(service.restore.remote({"serving_version": 2, "version_steps": {"2": 10},
                                          "completed": 2}))
    # v2's index (the checkpoint's weights), republished as v4: the version never goes back
    assert out["swapped"] and out["serving_version"] == 4 and out["available"]
    q = mixture(8, seed=5)[:, :16].copy()
    r = index.search(q, 5)
    assert r.version == 4 and np.array_equal(r.ids, _exact(store, emb, _weights(vocab, 10), q, 5))
    assert serving_dir(root) == version_dir(root, 4)
    assert load_manifest(version_dir(root, 4)).extra["republished_from"] == 2
    assert load_manifest(version_dir(root, 2)).version == 2  # the source's manifest untouched
    # the next refresh gets a fresh number: versions on disk are never reused
    ray.get(service.request.remote(put_weights(_weights(vocab, 30)), 30))
    assert ray.get(service.wait_idle.remote(120))["serving_version"] == 5


def test_embed_corpus_covers_every_block_once(small_workdir, ray_session):
    _, _, summary = small_workdir
    store = ChunkStore.open(summary["chunk_store"]["path"])
    emb = BagOfEmbeddings(store.tokenizer.pad_id)
    w = _weights(store.tokenizer.vocab_size, 9)
    ids, vecs = embed_corpus(emb, put_weights(w), store, RefreshConfig(num_workers=2), progress=False)
    assert np.array_equal(ids, np.arange(len(store)))
    np.testing.assert_allclose(vecs, emb(w, store.tokens(ids)), rtol=1e-6)


def test_swap_failing_after_current_names_the_new_version_keeps_it_and_a_restart_serves_it(
        refresh, monkeypatch, tmp_path):
    # shard 1 dies for good right after CURRENT is rewritten (the swap's commit point): the new
    # version must stay on disk, and shards started afterwards must find a complete index
    import ray

    import ratray.index.service as service_mod
    from ratray.index.refresh import RefreshError, RefreshService

    service, index, store, emb, root, _ = refresh
    real_write_current = service_mod.write_current

    def write_current_then_kill_a_shard(r, target):
        real_write_current(r, target)
        ray.kill(index.actors[1], no_restart=True)
        deadline = time.monotonic() + 60  # ray.kill returns at once: wait until the shard is dead
        while time.monotonic() < deadline:
            try:
                ray.get(index.actors[1].info.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.05)

    monkeypatch.setattr(service_mod, "write_current", write_current_then_kill_a_shard)
    svc = RefreshService(str(root), str(store.path), asdict(IndexConfig(factory="Flat", shards=2, metric="ip")),
                         asdict(ServiceConfig(name=index.name, namespace=NS)),
                         asdict(RefreshConfig(num_workers=2)), emb)  # in this process: the fault above
    w = _weights(store.tokenizer.vocab_size, 5)
    with pytest.raises(RefreshError, match="v2 is named by .*CURRENT"):
        svc.refresh_now(put_weights(w), 40, progress=False)
    assert serving_dir(root) == version_dir(root, 2)  # before: CURRENT named a deleted folder
    assert svc.status()["serving_version"] == 2 and svc.status()["version_steps"]["2"] == 40
    index.shutdown()
    again = ShardedIndex.launch(str(root), ServiceConfig(name=f"rs-{tmp_path.name}"[:40], namespace=NS))
    try:
        q = mixture(8, seed=6)[:, :16].copy()
        r = again.search(q, 5)
        assert r.version == 2 and np.array_equal(r.ids, _exact(store, emb, w, q, 5))
    finally:
        again.shutdown()


def test_refresh_service_restarts_after_a_crash_and_cleans_its_half_built_versions(refresh):
    import shutil

    import ray

    service, index, store, emb, root, _ = refresh
    shutil.copytree(version_dir(root, 1), version_dir(root, 2))  # complete, not serving: kept
    leftovers = [root / "versions" / ".v000003.tmp-deadbeef", root / "versions" / ".v000001.old-cafe"]
    for d in leftovers:
        d.mkdir()
        (d / "shard_0.faiss").write_bytes(b"half written")
    (root / ".CURRENT.tmp-1-2").write_text("versions/v000003\n")
    def pid():
        return ray.get(service.__ray_call__.remote(lambda _: os.getpid()), timeout=120)

    before = pid()
    ray.kill(service, no_restart=False)  # a crash: Ray restarts it (max_restarts=0 before)
    deadline = time.monotonic() + 120  # ray.kill is asynchronous: wait for the new process
    while pid() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    st = ray.get(service.status.remote(), timeout=120)
    assert st["serving_version"] == 1 and st["version_steps"] == {"1": 0, "2": 0}
    assert not any(d.exists() for d in leftovers) and not (root / ".CURRENT.tmp-1-2").exists()
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000001", "v000002"]
    assert serving_dir(root) == version_dir(root, 1)

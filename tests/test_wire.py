"""The direct search channel (ratray.index.wire): frames, pipelining, errors — no Ray, no FAISS."""
import threading

import numpy as np
import pytest

from ratray.index.wire import Connection, ShardError, ShardServer


def _brute_force(q: np.ndarray, k: int, version):
    """A stand-in shard: 1000 fixed vectors; k = 0 is refused like a bad request would be."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    base = np.random.default_rng(0).standard_normal((1000, q.shape[1])).astype(np.float32)
    d = ((q[:, None, :] - base[None]) ** 2).sum(-1)  # (b n)
    I = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, I, 1).astype(np.float32), I.astype(np.int64), 7 if version is None else version


@pytest.fixture
def server():
    s = ShardServer("127.0.0.1", _brute_force)
    yield s
    s.close()


def test_a_request_comes_back_with_the_handlers_answer_and_version(server):
    conn = Connection(server.address)
    q = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    D, I, v = conn.reply(conn.send(q, 5))
    want_D, want_I, _ = _brute_force(q, 5, None)
    assert v == 7 and np.array_equal(I, want_I) and np.array_equal(D, want_D)
    assert conn.reply(conn.send(q, 5, version=3))[2] == 3  # a pinned version is passed through
    conn.close()


def test_pipelined_requests_are_answered_in_order_whoever_reads_first(server):
    conn = Connection(server.address)
    rng = np.random.default_rng(2)
    qs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (1, 30, 5, 200)]
    seqs = [conn.send(q, 3) for q in qs]  # all sent before any reply is read
    for seq, q in reversed(list(zip(seqs, qs))):  # read the last first: the others are kept
        assert np.array_equal(conn.reply(seq)[1], _brute_force(q, 3, None)[1])


def test_big_batches_cross_in_pieces(server):
    """4 MB of queries (beyond one gathered send) and a reply of 2 x 80 KB."""
    conn = Connection(server.address)
    q = np.random.default_rng(3).standard_normal((2048, 512)).astype(np.float32)
    D, I, _ = conn.reply(conn.send(q, 10))
    assert I.shape == (2048, 10) and np.array_equal(I[:5], _brute_force(q[:5], 10, None)[1])


def test_a_refused_request_is_a_clear_error_and_the_channel_lives_on(server):
    conn = Connection(server.address)
    q = np.zeros((2, 16), np.float32)
    with pytest.raises(ShardError, match="k must be >= 1"):
        conn.reply(conn.send(q, 0))
    assert conn.reply(conn.send(q, 1))[1].shape == (2, 1)


def test_a_closed_server_breaks_the_channel_with_a_connection_error(server):
    conn = Connection(server.address)
    q = np.zeros((2, 16), np.float32)
    conn.reply(conn.send(q, 1))
    conn._sock.shutdown(2)  # as if the actor process died
    with pytest.raises(ConnectionError):
        conn.reply(conn.send(q, 1))
    assert conn.broken is not None
    with pytest.raises(ConnectionError, match="broken"):
        conn.send(q, 1)


def test_threads_share_one_connection(server):
    conn = Connection(server.address)
    rng = np.random.default_rng(4)
    qs = [rng.standard_normal((4, 16)).astype(np.float32) for _ in range(16)]
    out: dict = {}

    def ask(j):
        out[j] = conn.reply(conn.send(qs[j], 2))[1]

    threads = [threading.Thread(target=ask, args=(j,)) for j in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, q in enumerate(qs):
        assert np.array_equal(out[j], _brute_force(q, 2, None)[1])


def test_a_reply_that_does_not_come_times_out_and_breaks_the_channel():
    """A shard that stops answering: the wait ends at its timeout (the caller names the shard),
    and the channel is not reused (a late reply would be taken for the next request's)."""
    import time

    release = threading.Event()

    def stuck(q, k, version):
        release.wait(10)
        return _brute_force(q, k, version)

    server = ShardServer("127.0.0.1", stuck)
    conn = Connection(server.address)
    try:
        seq = conn.send(np.zeros((2, 16), np.float32), 3)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no reply within 0.5 s"):
            conn.reply(seq, timeout=0.5)
        assert 0.4 < time.monotonic() - t0 < 3 and conn.broken is not None
        assert conn.ready()  # a broken channel answers at once (SearchFuture.done polls it)
        with pytest.raises(ConnectionError, match="broken"):
            conn.send(np.zeros((2, 16), np.float32), 3)
    finally:
        release.set()
        conn.close()
        server.close()

"""A direct TCP channel between index clients and shard actors: the search path without Ray tasks.

    client ── request frame (k, version, queries q d float32) ──► ShardServer thread in the actor
           ◄── reply frame (version, distances q k float32, chunk ids q k int64) or error text ──

A Ray actor call costs ~1.5 ms per actor on a 2-core node (3.1 ms for a no-work fan-out to two
actors, 8 queries) — more than FAISS needs to search 8 queries (1.3 ms). Ray still places,
names, restarts and swaps the shard actors; only the search bytes travel here. Each actor serves
one listening socket on its node's address; every connection gets a thread and answers its
requests in order, so a client may send several requests before reading the replies
(`Connection.send` returns a sequence number, `Connection.reply(seq)` waits for that one).
Knows nothing of FAISS or Ray.
"""
from __future__ import annotations

import select
import socket
import struct
import threading
import time
from typing import Callable

import numpy as np

_REQ = struct.Struct("<4sIiII")  # magic, k, version (-1 = serving), queries, dim
_REP = struct.Struct("<4sBiIII")  # magic, status (0 ok / 1 error), version, queries, k', message bytes
_REQ_MAGIC, _REP_MAGIC = b"RTQ1", b"RTR1"

Handler = Callable[[np.ndarray, int, "int | None"], "tuple[np.ndarray, np.ndarray, int]"]


class ShardError(RuntimeError):
    """The shard answered with an error (bad queries, unknown version): the message says which."""


def _recv_into(sock: socket.socket, buf: memoryview) -> None:
    while len(buf):
        n = sock.recv_into(buf)
        if n == 0:
            raise ConnectionError("index channel closed by the other side")
        buf = buf[n:]


def _send(sock: socket.socket, frames: list) -> None:
    """All of `frames`, gathered into one system call (one TCP segment for a small request with
    TCP_NODELAY); whatever a partial send leaves goes after it."""
    views = [memoryview(f).cast("B") for f in frames]
    sent = sock.sendmsg(views)
    for v in views:
        if sent >= len(v):
            sent -= len(v)
            continue
        sock.sendall(v[sent:])
        sent = 0


def _recv_array(sock: socket.socket, shape: tuple, dtype) -> np.ndarray:
    out = np.empty(shape, dtype)
    _recv_into(sock, memoryview(out).cast("B"))
    return out


# ---------------------------------------------------------------------------------------------
# server side (inside a shard actor)


class ShardServer:
    """Listens on (host, any free port); `handler(queries, k, version)` answers each request."""

    def __init__(self, host: str, handler: Handler):
        self.handler = handler
        self._sock = socket.create_server((host, 0), backlog=64)
        self.address = (host, self._sock.getsockname()[1])
        threading.Thread(target=self._accept, name="ratray-index-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="ratray-index-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = bytearray(_REQ.size)
        with conn:
            while True:
                try:
                    _recv_into(conn, memoryview(head))
                except (ConnectionError, OSError):
                    return
                magic, k, version, nq, dim = _REQ.unpack(head)
                if magic != _REQ_MAGIC:
                    return  # not our protocol: drop the connection
                try:
                    q = _recv_array(conn, (nq, dim), np.float32)
                except (ConnectionError, OSError):
                    return
                try:
                    D, I, v = self.handler(q, k, None if version < 0 else version)
                    D = np.ascontiguousarray(D, np.float32)
                    I = np.ascontiguousarray(I, np.int64)
                    frames = [_REP.pack(_REP_MAGIC, 0, int(v), D.shape[0], D.shape[1], 0),
                              memoryview(D).cast("B"), memoryview(I).cast("B")]
                except Exception as e:  # the client raises it as ShardError
                    msg = f"{type(e).__name__}: {e}".encode()
                    frames = [_REP.pack(_REP_MAGIC, 1, -1, 0, 0, len(msg)), msg]
                try:
                    _send(conn, frames)
                except OSError:
                    return

    def close(self) -> None:
        self._sock.close()


# ---------------------------------------------------------------------------------------------
# client side


class Connection:
    """One client's connection to one shard server: pipelined requests, replies read in order.

    Thread-safe: sends are serialised, and a reply read for another waiter is kept for it."""

    def __init__(self, address: tuple[str, int], timeout: float = 300.0):
        self.address = tuple(address)
        self._sock = socket.create_connection(self.address, timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock, self._read_lock = threading.Lock(), threading.Lock()
        self._sent = self._read = 0  # requests sent / replies read
        self._kept: dict[int, object] = {}  # seq -> reply (or ShardError) read for another waiter
        self.broken: Exception | None = None

    def send(self, queries: np.ndarray, k: int, version: int | None = None) -> int:
        """Send one request (queries (b, d) float32, C-contiguous); returns its sequence number."""
        head = _REQ.pack(_REQ_MAGIC, k, -1 if version is None else int(version), *queries.shape)
        body = memoryview(queries).cast("B")
        with self._send_lock:
            self._check()
            try:
                _send(self._sock, [head, body])
            except OSError as e:
                self._fail(e)
            seq, self._sent = self._sent, self._sent + 1
            return seq

    def reply(self, seq: int, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Wait for request `seq`'s reply: distances (b, k'), chunk ids (b, k'), version.
        TimeoutError after `timeout` seconds without it; the channel is then broken for good (a
        late reply would be read as the next request's)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._read_lock.acquire(timeout=-1 if timeout is None else timeout):
            self._expire(timeout)
        try:
            while seq not in self._kept:
                self._check()
                if seq < self._read:
                    raise RuntimeError(f"reply {seq} was already taken")
                if deadline is not None and not select.select(
                        [self._sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    self._expire(timeout)
                try:
                    got: object = self._read_one()
                except ShardError as e:
                    got = e
                except (OSError, ConnectionError) as e:
                    self._fail(e)
                self._kept[self._read] = got
                self._read += 1
            got = self._kept.pop(seq)
        finally:
            self._read_lock.release()
        if isinstance(got, ShardError):
            raise got
        return got  # type: ignore[return-value]

    def ready(self) -> bool:
        """A reply is waiting to be read, or the channel broke (`reply` answers at once)."""
        return self.broken is not None or bool(self._kept) or \
            bool(select.select([self._sock], [], [], 0)[0])

    def _read_one(self) -> tuple[np.ndarray, np.ndarray, int]:
        head = bytearray(_REP.size)
        _recv_into(self._sock, memoryview(head))
        magic, status, version, nq, kk, msg_len = _REP.unpack(head)
        if magic != _REP_MAGIC:
            raise ConnectionError(f"index channel {self.address}: not a ratray shard server")
        if status:
            raise ShardError(bytes(_recv_array(self._sock, (msg_len,), np.uint8)).decode())
        D = _recv_array(self._sock, (nq, kk), np.float32)
        I = _recv_array(self._sock, (nq, kk), np.int64)
        return D, I, version

    def _check(self) -> None:
        if self.broken is not None:
            raise ConnectionError(f"index channel {self.address} is broken: {self.broken}")

    def _expire(self, timeout: float) -> None:
        self.broken = TimeoutError(f"no reply within {timeout:g} s")
        self.close()
        raise TimeoutError(f"index channel {self.address}: no reply within {timeout:g} s")

    def _fail(self, e: Exception) -> None:
        self.broken = e
        self.close()
        raise ConnectionError(f"index channel {self.address}: {e}") from None

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


class Channels:
    """One client process's channels to S shards: each opened on first use; one that breaks is
    dropped and its shard's address asked again (`resolve(i)`; a restarted actor listens on a new
    port). `get(i)` is None where a shard has no channel or cannot be reached: the caller then
    uses another path. Pickles without its connections (they belong to one process)."""

    def __init__(self, addresses: list, resolve: Callable[[int], "tuple | None"],
                 timeout: float = 300.0):
        self.addresses, self.resolve, self.timeout = list(addresses), resolve, timeout
        self.conns: list[Connection | None] = [None] * len(self.addresses)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"addresses": self.addresses, "resolve": self.resolve, "timeout": self.timeout}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["addresses"], state["resolve"], state["timeout"])

    def get(self, i: int) -> Connection | None:
        with self._lock:
            conn = self.conns[i]
            if conn is not None and conn.broken is None:
                return conn
            self.conns[i] = None
            for attempt in range(2):  # the second with the address the shard gives now
                if self.addresses[i] is None:
                    return None
                try:
                    self.conns[i] = Connection(tuple(self.addresses[i]), self.timeout)
                    return self.conns[i]
                except OSError:
                    if attempt == 0:
                        self._refresh(i)
            return None

    def drop(self, i: int, conn: Connection) -> None:
        """`conn` broke (its actor died or restarted): forget it, learn the shard's address anew."""
        with self._lock:
            if self.conns[i] is conn:
                self.conns[i] = None
        conn.close()
        self._refresh(i)

    def _refresh(self, i: int) -> None:
        try:
            self.addresses[i] = self.resolve(i)
        except Exception:  # the shard is (re)starting: keep the old address, try again next time
            pass

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None:
                conn.close()
        self.conns = [None] * len(self.conns)


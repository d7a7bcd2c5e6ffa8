"""GPU paths for the index shards: detect a GPU, copy a FAISS index onto it, serialise its calls.

Everything here imports and answers cleanly on a machine without CUDA or without faiss-gpu
(`gpu_count()` is 0 there, `gpu_index_or_none()` returns None and says why); nothing touches a
GPU at import time.

    from ratray.index.gpu import gpu_count, GpuIndex

    if gpu_count() > 0:
        enable_reconstruct(cpu_index)                 # before wrapping: decoding stays on the CPU
        gidx = GpuIndex.from_cpu(cpu_index, device=shard % gpu_count())
        D, I = search_topk(gidx, ids, q, k, metric, vectors=gidx.stored_vectors())

Why a wrapper and a lock:

- FAISS GPU indexes do not support concurrent queries, nor a search concurrent with an add
  (the FAISS wiki, "Threads and asynchronous calls": "Faiss GPU indices are not thread-safe, even
  for read only functions"), and a `StandardGpuResources` (CUDA stream, cuBLAS handle,
  scratch-memory pool) must not be used from two threads at once either. A shard actor serves
  `max_concurrency` searches on threads, so each `GpuIndex` owns its resources object and one
  `threading.Lock`, and every call into the GPU index goes through that lock. Nothing is shared
  between two GPU indexes, so two shards (or two index versions during a swap) run in parallel.
  `temp_memory_mb` caps the scratch pool when several indexes share a device.
- The CPU index is kept next to the GPU copy. `ratray.index.search.search_topk` re-scores the
  k + margin candidates exactly from stored vectors: for a flat index `stored_vectors()` is a
  zero-copy view of the CPU index's storage, for compressed indexes `reconstruct_batch` decodes on
  the CPU (thread-safe, no GPU lock held). Only the candidate search runs on the GPU.
- Not every FAISS index has a GPU version (HNSW, for one, does not): `gpu_index_or_none` returns
  None with the reason instead of raising, so a shard falls back to its CPU index.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger(__name__)


def faiss_has_gpu() -> bool:
    """True when the installed `faiss` module was built with GPU support (the faiss-gpu wheel)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "index_cpu_to_gpu")


def gpu_count() -> int:
    """GPUs FAISS can put an index on: 0 without faiss-gpu, without CUDA or without a device.

    Never raises: a broken CUDA install (driver missing, no device visible to this process)
    counts as no GPU."""
    if not faiss_has_gpu():
        return 0
    import faiss

    try:
        return max(0, int(faiss.get_num_gpus()))
    except Exception as e:  # CUDA runtime present but unusable
        log.info("faiss-gpu is installed but reports no usable GPU: %s", e)
        return 0


def torch_gpu_build() -> bool:
    """True when the installed torch is a CUDA (or ROCm) build; read from torch/version.py
    without importing torch (which takes seconds)."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    version_py = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        tree = ast.parse(version_py.read_text())
    except (OSError, SyntaxError):
        return True  # unknown layout: let torch itself answer
    values = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and node.value is not None:
            try:
                values[target.id] = ast.literal_eval(node.value)
            except ValueError:
                values[target.id] = "?"
    return bool(values.get("cuda") or values.get("hip"))


def torch_cuda_count() -> int:
    """CUDA devices torch can use (training); 0 without a CUDA build of torch or a device."""
    if not torch_gpu_build():
        return 0
    try:
        import torch
    except ImportError:
        return 0
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a CUDA build without a driver
        return 0


def new_gpu_resources(temp_memory_mb: int | None = None):
    """A fresh `faiss.StandardGpuResources`; `temp_memory_mb` sets its scratch pool (None = FAISS's
    default). One per GPU index: the object is not thread-safe."""
    import faiss

    res = faiss.StandardGpuResources()
    if temp_memory_mb is not None:
        res.setTempMemory(int(temp_memory_mb) * 1024 * 1024)
    return res


def index_to_gpu(index, device: int = 0, use_float16: bool = False,
                 temp_memory_mb: int | None = None):
    """A GPU copy of a CPU FAISS index on `device` (`faiss.index_cpu_to_gpu` with its own
    `StandardGpuResources`, kept alive by the returned index).

    Raises RuntimeError naming the reason when there is no GPU, the device does not exist, or the
    index type has no GPU implementation. `use_float16` stores flat/IVF-flat vectors and PQ lookup
    tables in fp16 (half the memory; needed for some large PQ code sizes)."""
    n = gpu_count()
    if n == 0:
        raise RuntimeError("no GPU for FAISS: faiss-gpu is not installed or no CUDA device is visible")
    if not 0 <= device < n:
        raise RuntimeError(f"GPU {device} does not exist: FAISS sees {n} GPU(s)")
    import faiss

    co = faiss.GpuClonerOptions()
    co.useFloat16 = bool(use_float16)
    if hasattr(co, "useFloat16LookupTables"):
        co.useFloat16LookupTables = bool(use_float16)
    res = new_gpu_resources(temp_memory_mb)
    try:
        gpu_index = faiss.index_cpu_to_gpu(res, device, index, co)
    except RuntimeError as e:  # e.g. "not implemented for this type of index" (HNSW)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"index {type(index).__name__} cannot move to GPU {device}: {first}") from None
    gpu_index.referenced_objects = [res]  # FAISS's own idiom: the resources live as long as the index
    return gpu_index


def gpu_index_or_none(index, device: int = 0, **kwargs) -> "GpuIndex | None":
    """`GpuIndex.from_cpu(index, device)` when possible, else None (the reason is logged)."""
    try:
        return GpuIndex.from_cpu(index, device, **kwargs)
    except RuntimeError as e:
        log.info("index stays on the CPU: %s", e)
        return None


class GpuIndex:
    """A FAISS index on one GPU behind its own lock, with the CPU original kept for decoding.

    Quacks like the parts of `faiss.Index` that `ratray.index.search.search_topk` uses:
    `ntotal`, `d`, `search(q, k)` (GPU, serialised) and `reconstruct_batch(keys)` (CPU). Pass
    `vectors=gidx.stored_vectors()` to `search_topk` for flat indexes."""

    def __init__(self, cpu_index, gpu_index, device: int):
        self.cpu, self.gpu, self.device = cpu_index, gpu_index, device
        self.lock = threading.Lock()  # the GPU index (and its resources) take one call at a time
        self.calls = 0  # searches served (diagnostics)

    @classmethod
    def from_cpu(cls, cpu_index, device: int = 0, use_float16: bool = False,
                 temp_memory_mb: int | None = None) -> "GpuIndex":
        return cls(cpu_index, index_to_gpu(cpu_index, device, use_float16, temp_memory_mb), device)

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    @property
    def d(self) -> int:
        return int(self.cpu.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(b, d) float32 -> distances (b, k), row positions (b, k): on the GPU, one call at a time."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        with self.lock:
            if self.gpu is None:
                raise RuntimeError(f"{self!r}: the GPU copy was released")
            self.calls += 1
            return self.gpu.search(q, k)

    def add(self, vectors: np.ndarray) -> None:
        """Append to both copies (under the lock: no search runs on the GPU copy meanwhile)."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.lock:
            if self.gpu is None:
                raise RuntimeError(f"{self!r}: the GPU copy was released")
            self.gpu.add(x)
            self.cpu.add(x)

    def reconstruct_batch(self, keys: np.ndarray) -> np.ndarray:
        """Decode stored vectors from the CPU copy (needs `enable_reconstruct` on it for IVF)."""
        return self.cpu.reconstruct_batch(np.ascontiguousarray(keys, dtype=np.int64))

    def stored_vectors(self) -> np.ndarray | None:
        """The CPU flat storage (zero-copy) for exact re-scoring, or None for compressed indexes."""
        from ratray.index.search import stored_vectors

        return stored_vectors(self.cpu)

    def release(self) -> None:
        """Free the GPU copy now (the CPU index stays usable)."""
        with self.lock:
            self.gpu = None

    def __repr__(self) -> str:
        return f"GpuIndex({type(self.cpu).__name__}, ntotal={self.ntotal}, device={self.device})"

"""GPU paths on machines without a GPU: detection agrees with the installed torch and faiss
builds, answers 0 and says why, the helpers refuse cleanly, bench/gpu_check.py exits 0 with a
clear message; and the device-independent parts of the GPU code (the per-index lock, search_topk
through the GPU wrapper, the top-k comparison and the training-step loop of the GPU check) run
here on the CPU so they are exercised before any GPU sees them. On a GPU machine
`python bench/gpu_check.py` is the check (docs/scaling.md)."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ratray.index import gpu
from ratray.index.gpu import GpuIndex, faiss_has_gpu, gpu_count, gpu_index_or_none, index_to_gpu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

no_faiss_gpu = pytest.mark.skipif(faiss_has_gpu(), reason="faiss-gpu is installed: the CPU-only behaviour does not apply")
no_gpu = pytest.mark.skipif(gpu_check.no_gpu_reason() is None, reason="this machine has a GPU: run bench/gpu_check.py")


def flat_index(n=3000, d=32, seed=0):
    import faiss

    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d), dtype=np.float32)
    index = faiss.IndexFlatL2(d)
    index.add(xb)
    return index, xb


@no_faiss_gpu
def test_without_faiss_gpu_there_is_no_gpu_and_the_helpers_say_so():
    assert gpu_count() == 0
    index, _ = flat_index(100)
    with pytest.raises(RuntimeError, match="no GPU for FAISS"):
        index_to_gpu(index, 0)
    with pytest.raises(RuntimeError, match="no GPU for FAISS"):
        GpuIndex.from_cpu(index, 0)
    assert gpu_index_or_none(index, 0) is None


def test_torch_detection_agrees_with_the_installed_torch():
    """torch_gpu_build() reads torch/version.py without importing torch: it must give the answer
    the imported torch gives (a CPU wheel here: False, and no CUDA devices counted)."""
    import torch

    assert gpu.torch_gpu_build() is bool(torch.version.cuda or torch.version.hip)
    assert gpu.torch_cuda_count() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _faiss_distributions() -> set[str]:
    from importlib import metadata

    return {d.metadata["Name"].lower() for d in metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("faiss")}


def test_faiss_detection_agrees_with_the_installed_faiss_wheel():
    """faiss_has_gpu() is True exactly when a faiss-gpu wheel provides the `faiss` module (the
    project's `gpu` extra); with faiss-cpu (the `cpu` extra, this machine) FAISS counts no GPU
    whatever torch sees. The wheels install the same module: exactly one may be installed."""
    wheels = _faiss_distributions()
    assert len(wheels) == 1, wheels
    gpu_wheel = wheels.pop().startswith("faiss-gpu")
    assert faiss_has_gpu() is gpu_wheel
    if not gpu_wheel:
        assert gpu_count() == 0


@no_faiss_gpu
def test_without_faiss_gpu_an_index_stays_on_the_cpu_and_the_log_says_why(caplog):
    index, _ = flat_index(100)
    with caplog.at_level(logging.INFO, logger=gpu.__name__):
        assert gpu_index_or_none(index, 0) is None
    assert [r.getMessage() for r in caplog.records if r.name == gpu.__name__] == [
        "index stays on the CPU: no GPU for FAISS: faiss-gpu is not installed or no CUDA device is visible"]


@no_gpu
def test_gpu_check_exits_cleanly_without_a_gpu(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "no GPU on this machine" in p.stdout and "skipped" in p.stdout
    assert '"skipped": true' in out.read_text()


class _OneAtATime:
    """Stands in for a FAISS GPU index: fails if two calls ever overlap (GPU indexes take one
    call at a time), otherwise answers like the CPU index it wraps."""

    def __init__(self, index):
        self.index, self.active, self.max_active = index, 0, 0
        self._count = threading.Lock()

    def search(self, q, k):
        with self._count:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(0.002)  # long enough for other threads to pile in without the lock
        try:
            return self.index.search(q, k)
        finally:
            with self._count:
                self.active -= 1

    def add(self, x):
        self.index.add(x)


def test_the_index_lock_serialises_calls_into_the_gpu_index():
    cpu, xb = flat_index()
    fake = _OneAtATime(flat_index()[0])
    g = GpuIndex(cpu, fake, device=0)
    assert gpu_check.concurrent_matches(g, xb[:64], 5, threads=8)
    assert fake.max_active == 1 and g.calls > 8
    # the same traffic without the wrapper's lock does overlap: the check above can fail
    raw = _OneAtATime(flat_index()[0])
    ts = [threading.Thread(target=lambda: [raw.search(xb[:8], 5) for _ in range(5)]) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert raw.max_active > 1


def test_search_topk_through_the_wrapper_equals_the_cpu_index():
    from ratray.index.search import search_topk

    cpu, xb = flat_index()
    g = GpuIndex(cpu, flat_index()[0], device=0)
    ids = np.arange(len(xb), dtype=np.int64) * 5 + 1
    q = xb[:40] + 0.01
    D0, I0 = search_topk(cpu, ids, q, 7, "l2")
    D1, I1 = search_topk(g, ids, q, 7, "l2", vectors=g.stored_vectors())
    assert np.array_equal(I0, I1) and np.allclose(D0, D1)
    assert g.ntotal == len(xb) and g.d == xb.shape[1]
    np.testing.assert_array_equal(g.reconstruct_batch(np.array([3, 9])), xb[[3, 9]])
    g.add(xb[:10])  # both copies grow together
    assert g.ntotal == len(xb) + 10 and g.gpu.ntotal == len(xb) + 10
    g.release()
    with pytest.raises(RuntimeError, match="released"):
        g.search(q, 3)


def test_compare_topk_accepts_tie_swaps_and_catches_wrong_neighbours():
    D = np.array([[0.1, 0.2, 0.2, 0.5]], np.float32)
    I = np.array([[4, 7, 9, 2]])
    assert gpu_check.compare_topk(D, I, D, I)["agree_rows"] == 1
    swapped = np.array([[4, 9, 7, 2]])  # equal distances: either order is a correct top-k
    assert gpu_check.compare_topk(D, I, D, swapped)["agree_rows"] == 1
    kth = np.array([[0.1, 0.2, 0.5, 0.5]], np.float32)  # a tie cut at the k-th place
    assert gpu_check.compare_topk(kth, np.array([[4, 7, 2, 3]]), kth, np.array([[4, 7, 2, 8]]))["agree_rows"] == 1
    wrong = np.array([[4, 7, 9, 3]])  # a different 4th neighbour at a different distance
    r = gpu_check.compare_topk(D, I, D * [[1, 1, 1, 1.5]], wrong)
    assert r["agree_rows"] == 0 and r["first_bad_row"] == 0
    assert gpu_check.overlap_at_k(I, wrong) == 0.75


def test_gpu_checks_training_loop_runs_retro_steps_on_cpu():
    from ratray.retro.model import RetroConfig

    cfg = RetroConfig.tiny(k=2)
    r = gpu_check.train_steps(cfg, "cpu", steps=3, micro_batch=2, precision="bf16", use_deepspeed=False)
    assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))
    assert r["tokens_per_s"] > 0 and r["params"] > 0
    idx, nb, tgt = gpu_check.retro_batch(cfg, 2, np.random.default_rng(0))
    assert idx.shape == tgt.shape == (2, cfg.seq_len)
    assert nb.shape == (2, cfg.seq_len // cfg.chunk_tokens, cfg.k, cfg.neighbour_len)


def test_torch_build_is_read_from_its_version_file(tmp_path, monkeypatch):
    import importlib.util
    import types

    pkg = tmp_path / "torch"
    pkg.mkdir()
    spec = types.SimpleNamespace(submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "torch" else None)
    (pkg / "version.py").write_text("from typing import Optional\ncuda: Optional[str] = '12.8'\n"
                                    "hip: Optional[str] = None\n")
    assert gpu.torch_gpu_build() is True
    (pkg / "version.py").write_text("cuda = None\nhip = None\n")
    assert gpu.torch_gpu_build() is False and gpu.torch_cuda_count() == 0
    (pkg / "version.py").write_text("cuda = None\nhip = '6.2'\n")  # ROCm builds answer torch.cuda too
    assert gpu.torch_gpu_build() is True

"""The retrieval database's index: FAISS factory, on-disk store, search kernels, build, embedding,
the Ray shard actors and their client, REALM's refresh service, GPU helpers. Never imports a model
or the trainer.

Two environment settings must be in place before libgomp / OpenBLAS load, i.e. before the first
`import faiss` in a process; every module of this package comes after this file (set them
yourself to override)."""
import os
from pathlib import Path

# OpenMP threads that spin while waiting are catastrophic on a shared 2-core box: PQ training ran
# 7-10x slower under load with the default (active) policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def openblas_coretype(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS kernel family this CPU runs ("SkylakeX", "Haswell"), from /proc/cpuinfo's
    flags; None where unknown (not Linux, or an older CPU: OpenBLAS's own detection stands).

    faiss-cpu's wheels bundle OpenBLAS 0.3.15, which does not recognise CPUs newer than itself
    (e.g. Sapphire Rapids) and falls back to its Prescott (SSE3) kernels: every FAISS matrix
    product — IVF coarse quantization, flat search of 20+ queries, k-means — ran 3-5x slower
    (1024 queries x 1024 centroids x 384: 55 ms on Prescott, 10.5 ms on SkylakeX, one thread)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


if "OPENBLAS_CORETYPE" not in os.environ and (_core := openblas_coretype()):
    os.environ["OPENBLAS_CORETYPE"] = _core

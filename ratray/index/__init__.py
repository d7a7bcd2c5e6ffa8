"""The retrieval database's index: FAISS factory, on-disk store, search kernels, build, embedding,
the Ray shard actors and their client, REALM's refresh service, GPU helpers. Never imports a model
or the trainer."""
import os

# OpenMP threads that spin while waiting are catastrophic on a shared 2-core box: PQ training ran
# 7-10x slower under load with the default (active) policy. Must be set before libgomp loads, i.e.
# before the first `import faiss` in this process: every module of this package comes after this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

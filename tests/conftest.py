"""Shared fixtures: one local Ray per test session, small real corpora."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall FAISS on busy cores

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs, no dashboard), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace="ratray-tests",
                 log_to_driver=False, object_store_memory=512 * 1024 * 1024)
    yield ray
    ray.shutdown()


SMALL_BUILD = ["corpus.max_docs=40", "corpus.max_bytes=90000", "corpus.val_fraction=0.2", "chunks.chunk_tokens=32",
               "chunks.vocab_size=2048", "index.factory=Flat", "index.shards=2",
               "index.recall_queries=50"]


@pytest.fixture(scope="session")
def small_workdir(ray_session, tmp_path_factory):
    """A workdir with a chunk store (32-token chunks), embeddings and a 2-shard Flat index built
    from the first ~90 KB of stdlib modules: shared by the build, neighbour and training tests."""
    from ratray.build import build
    from ratray.config import BuildConfig, load_config

    wd = tmp_path_factory.mktemp("small")
    cfg = load_config(BuildConfig, None, SMALL_BUILD + [f"workdir={wd}"])
    summary = build(cfg, progress=False)
    return wd, cfg, summary

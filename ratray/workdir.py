"""The workdir: every path under it, in one place. Nothing else builds a workdir path.

    <workdir>/
      chunks/<key>/            chunk stores (ratray.data.chunks), one per corpus + settings
      embeddings/<model id>/   the frozen retriever's embedding cache (ratray.index.embed)
      vectors/                 every chunk's retriever vector, row = chunk id (RETRO's queries)
      index/                   the database's sharded FAISS index + summary.json (ratray.build)
      runs/<name>/             one training run: summary.json, plots, neighbour tables and, for
        index/                 REALM, the run's own versioned index (versions/vNNNNNN + CURRENT)
        eval/                  its evaluation (jobs/evaluate.py): report, plots, per-chunk scores
      experiments/<name>/      a comparison of runs (jobs/retro_experiment.py)
      ray_results/             Ray Train storage (checkpoints), unless train.storage_path says else
      mlflow.db, mlartifacts/  the embedded MLflow store, unless MLFLOW_TRACKING_URI says else

Paths are absolute (Ray workers and actors run in other folders); no folder is created here.
"""
from __future__ import annotations

import os
from pathlib import Path

SUMMARY = "summary.json"


class Workdir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        # the database
        self.chunks = self.root / "chunks"  # parent of every chunk store (`chunks/<key>`)
        self.embeddings = self.root / "embeddings"  # the embedding cache (a folder per model id)
        self.vectors = self.root / "vectors"  # every chunk's retriever vector (RETRO's queries)
        self.index = self.root / "index"
        self.index_summary = self.index / SUMMARY
        # runs and tracking
        self.runs = self.root / "runs"
        self.mlflow_db = self.root / "mlflow.db"
        self.mlartifacts = self.root / "mlartifacts"

    def __repr__(self) -> str:
        return f"Workdir({str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    def chunk_store(self, key: str) -> Path:
        return self.chunks / key

    def run(self, name: str) -> Path:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"run name {name!r} must be a plain folder name")
        return self.runs / name

    def run_summary(self, name: str) -> Path:
        return self.run(name) / SUMMARY

    def run_eval(self, name: str) -> Path:
        """A run's evaluation: report.json, report.md, plots, per-chunk and per-document scores."""
        return self.run(name) / "eval"

    def run_index(self, name: str) -> Path:
        """A run's own (versioned) index: REALM's refreshed index lives with its run."""
        return self.run(name) / "index"

    def experiment(self, name: str) -> Path:
        """A comparison of runs (jobs/retro_experiment.py): its report and plots."""
        return self.root / "experiments" / self.run(name).name

    def ray_results(self, storage_path: str | None = None) -> str:
        """Ray Train storage: `storage_path` when given (a folder or a URI, as is), else
        `<workdir>/ray_results`."""
        return storage_path or str(self.root / "ray_results")

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

Paths are absolute (Ray workers and actors run in other folders); no folder is created here,
except by `locked`, which takes the workdir's build lock (`<workdir>/.build.lock`).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SUMMARY = "summary.json"
LOCK = ".build.lock"
SHARED_LEFTOVER_AGE_S = 3600  # see remove_leftovers


class WorkdirError(RuntimeError):
    """The workdir cannot be used (not writable, or busy): a one-line error for the user."""


class WorkdirBusyError(WorkdirError):
    """Another process holds the workdir's build lock (two builds into one workdir would race)."""


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

    @contextmanager
    def locked(self, purpose: str = "build") -> Iterator[None]:
        """Hold `<workdir>/.build.lock` (flock: released by the OS even if this process is killed).
        Fails at once, naming the holder, if another process holds it."""
        path = self.root / LOCK
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")
        except OSError as e:
            raise WorkdirError(f"workdir {self.root}: cannot create {path.name} ({e.strerror})") from None
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise WorkdirBusyError(f"workdir {self.root} is in use: {holder} (lock {path}); wait "
                                       f"for it to finish or use another workdir") from None
            f.seek(0)
            f.truncate()
            f.write(f"{purpose} of pid {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            yield
        finally:
            f.close()  # releases the lock

    def remove_leftovers(self, shared_age_s: float = SHARED_LEFTOVER_AGE_S) -> list[str]:
        """Call holding the lock: remove the `.tmp-`/`.old-` folders and files that killed builds
        left. The index's always (only a build writes it); those of the chunk stores and the
        embedding cache only once untouched for `shared_age_s` (a REALM driver or a training run
        writes there without the lock). Returns the paths removed, relative to the workdir."""
        now, removed = time.time(), []
        places = [(self.root, f".{self.index.name}.", 0.0), (self.chunks, ".", shared_age_s),
                  *((d, ".tmp-", shared_age_s) for d in self.embeddings.glob("*") if d.is_dir())]
        for folder, prefix, age in places:
            for p in folder.glob(prefix + "*") if folder.is_dir() else []:
                if (".tmp-" in p.name or ".old-" in p.name) and now - _newest_mtime(p) >= age:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(str(p.relative_to(self.root)))
        return removed

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


def _newest_mtime(p: Path) -> float:
    """The last time `p` or anything directly in it changed."""
    try:
        return max([p.stat().st_mtime, *(c.stat().st_mtime for c in p.iterdir())] if p.is_dir()
                   else [p.stat().st_mtime])
    except OSError:  # gone meanwhile
        return time.time()

"""Experiment tracking: MLflow on rank 0, a deliberate no-op everywhere else.

Knows nothing of models: callers hand it plain dicts of params and floats.

- Store: ``tracking_uri(workdir)`` is ``$MLFLOW_TRACKING_URI`` when set, else a SQLite file
  ``sqlite:///<abs workdir>/mlflow.db`` (MLflow 3 refuses the plain file store by default).
  Artifacts of experiments created here go to ``<workdir>/mlartifacts`` (absolute), never to the
  process's current directory — a Ray Train worker's cwd is a throwaway session folder.
- Telemetry: importing this module sets ``MLFLOW_DISABLE_TELEMETRY=true`` unless the caller already
  chose a value.
- Only ``mlflow.MlflowClient`` with explicit run ids is used: no global active run, so it works from
  a Ray Train rank-0 worker process and from threads.
- Resume: ``Tracker.start(..., resume=True)`` looks for a run in the experiment tagged
  ``ratray.run_name=<run_name>`` (newest first, deleted runs ignored) and continues that run (same
  run id, status set back to RUNNING); metrics logged afterwards append to its history. MLflow
  appends a point logged again at a step it already holds (it never overwrites), so a resumed
  tracker skips every step up to the last one the run logged: a retry that resumes from an older
  checkpoint redoes those steps without duplicating their points.
- Params on resume: MLflow forbids changing a logged param. An identical value is skipped; a
  *changed* value keeps the original param and is recorded as the tag ``resume.<key>`` (tags are
  mutable, so a later resume overwrites it with the newest value) plus a warning. Nothing crashes.
- Values are stringified and truncated to MLflow's param limit (6000 chars, tags 8000) with a
  trailing ``...`` marker.

What the MLflow UI shows (experiment kind, chart order, description, datasets): ratray/mlflow_view.py.
System metrics (CPU, memory, disk, network; GPU with pynvml): ``Tracker.start(...,
system_metrics=seconds)`` samples them on the tracking process (rank 0) under ``system/`` until
:meth:`Tracker.end`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ratray.mlflow_view import describe_run, run_url, typed_experiment
from ratray.workdir import Workdir

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger(__name__)

RUN_NAME_TAG = "ratray.run_name"
RESUME_TAG_PREFIX = "resume."
MAX_PARAM_VAL_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (3.x)
MAX_TAG_VAL_LENGTH = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
_TRUNC = "..."
DATASET_CONTEXT = "training"


def tracking_uri(workdir: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` if set (non-empty), else ``sqlite:///<abs workdir>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Workdir(workdir).mlflow_db}"


def _truncate(value: Any, limit: int) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - len(_TRUNC)] + _TRUNC


def flatten_params(params: Mapping[str, Any] | None, prefix: str = "") -> dict[str, str]:
    """Nested dict → ``{"a.b": "value"}`` with values stringified and truncated to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in (params or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = _truncate(v, MAX_PARAM_VAL_LENGTH)
    return out


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        log.warning("tracking: skipping non-numeric metric value %r", value)
        return None
    return None if math.isnan(f) else f


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _mlflow_cli() -> str:
    exe = Path(sys.executable).with_name("mlflow")
    return str(exe) if exe.exists() else "mlflow"


def ui_command(uri: str, port: int = 5000) -> str:
    """The shell command that opens the MLflow UI on the store at `uri`."""
    if uri.startswith(("http://", "https://")):
        return f"{shlex.quote(sys.executable)} -m webbrowser {shlex.quote(uri)}"
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {shlex.quote(_mlflow_cli())} ui "
            f"--backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port {port} --workers 1")


class Tracker:
    """One MLflow run addressed by id. Create with :meth:`start`."""

    def __init__(self, client, run_id: str, experiment_id: str, uri: str, resumed: bool):
        self._client = client
        self._run_id = run_id
        self._experiment_id = experiment_id
        self._uri = uri
        self.resumed = resumed
        self._ended = False
        self._monitor = None  # the system-metrics sampler, when started
        self.logged_through = self._last_step() if resumed else None  # steps <= this: skipped

    def _last_step(self) -> int | None:
        """The highest step any metric of the run was logged at (None: no metric yet)."""
        keys = self._client.get_run(self._run_id).data.metrics
        steps = [m.step for k in keys for m in self._client.get_metric_history(self._run_id, k)]
        return max(steps, default=None)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def start(cls, workdir: str | os.PathLike, experiment: str, run_name: str,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              resume: bool = True, system_metrics: float | None = None) -> "Tracker":
        """`system_metrics`: sample CPU/memory/disk/network every that many seconds (None: off)."""
        from mlflow import MlflowClient

        uri = tracking_uri(workdir)
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)

        artifact_location = None
        if "://" not in uri or uri.startswith(("sqlite:", "file:")):
            artifact_location = Workdir(workdir).mlartifacts.as_uri()
        experiment_id = typed_experiment(client, experiment, artifact_location)

        run_id = None
        if resume:
            value = run_name.replace("'", "\\'")
            found = client.search_runs([experiment_id],
                                       filter_string=f"tags.`{RUN_NAME_TAG}` = '{value}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
        resumed = run_id is not None
        if run_id is None:
            all_tags = {RUN_NAME_TAG: run_name}
            all_tags.update({str(k): _truncate(v, MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()})
            run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
            run_id = run.info.run_id
        tracker = cls(client, run_id, experiment_id, uri, resumed)
        if resumed and tags:
            tracker.set_tags(tags)
        if params:
            tracker.log_params(params)
        if system_metrics:
            tracker._start_system_metrics(system_metrics)
        return tracker

    def _start_system_metrics(self, interval: float) -> None:
        """MLflow's sampler thread (needs psutil) logging ``system/*`` to this run; a resumed run
        continues its steps."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines
        self._monitor = SystemMetricsMonitor(self._run_id, sampling_interval=interval,
                                             resume_logging=self.resumed, tracking_uri=self._uri)
        self._monitor.start()

    def _stop_system_metrics(self) -> None:
        """Stop the sampler; what it sampled since its last point is logged too (a short run)."""
        mon, self._monitor = self._monitor, None
        if mon is None:
            return
        mon.finish()
        last = mon.aggregate_metrics()
        if last:
            mon.publish_metrics(last)
            mon.mlflow_logger.flush()

    # -- properties ---------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def enabled(self) -> bool:
        return True

    # -- logging ------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log a batch at ``step``; None/NaN (and non-numeric) values are skipped, never raised,
        and so is a step a resumed run had already logged (a redone step)."""
        from mlflow.entities import Metric

        if self.logged_through is not None and int(step) <= self.logged_through:
            return
        ts = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            f = _finite_or_none(v)
            if f is not None:
                batch.append(Metric(str(k), f, ts, int(step)))
        for part in _chunks(batch, _METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=part)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flatten + log. Re-logging an identical value is a no-op; a changed value (resume with a
        new config) keeps the original param and is recorded as the tag ``resume.<key>``."""
        from mlflow.entities import Param

        flat = flatten_params(params)
        existing = self._client.get_run(self._run_id).data.params
        new, changed = [], {}
        for k, v in flat.items():
            if k not in existing:
                new.append(Param(k, v))
            elif existing[k] != v:
                changed[RESUME_TAG_PREFIX + k] = v
        for part in _chunks(new, _PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=part)
        if changed:
            log.warning("tracking: %d param(s) differ from the resumed run; recorded as tags %s",
                        len(changed), ", ".join(sorted(changed)[:5]))
            self.set_tags(changed)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), _truncate(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for part in _chunks(items, _PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=part)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self._run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """``name`` is the artifact file (``.json`` or ``.yaml``/``.yml`` picks the format)."""
        self._client.log_dict(self._run_id, obj, name)

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any],
                    schema: Mapping[str, Any] | None = None, context: str = DATASET_CONTEXT) -> None:
        """Record a dataset as an input of the run (the UI's "Datasets"): `digest` identifies its
        content (at most 36 characters), `profile` its counts, `source` where it lives."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        if not name or not digest or len(digest) > 36:
            raise ValueError(f"dataset {name!r}: a name and a digest of 1-36 characters are needed, "
                             f"got digest {digest!r}")
        ds = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                     schema=json.dumps(schema) if schema else None, profile=json.dumps(dict(profile)))
        self._client.log_inputs(self._run_id, datasets=[
            DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def end(self, status: str = "FINISHED") -> None:
        """Stop the system-metrics sampler, write the run's description, set its final status."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED|FAILED|KILLED, got {status!r}")
        self._stop_system_metrics()
        try:
            describe_run(self._client, self._run_id)
        except Exception as e:  # the description is a view: never fail a run over it
            log.warning("tracking: run description not written: %s", e)
        self._client.set_terminated(self._run_id, status=status)
        self._ended = True

    def ui_command(self, port: int = 5000) -> str:
        """The shell command that opens the MLflow UI on this store."""
        return ui_command(self._uri, port)

    def run_url(self, port: int = 5000, tab: str = "model-metrics") -> str:
        """This run's page: on the tracking server, or on `mlflow ui` at `port`."""
        base = self._uri if self._uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{port}"
        return run_url(base, self._experiment_id, self._run_id, tab)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._ended:
            self.end("FAILED" if exc_type is not None else "FINISHED")


class NullTracker:
    """Same interface as :class:`Tracker`, does nothing (ranks ≠ 0). Touches no store."""

    run_id = None
    experiment_id = None
    uri = None
    resumed = False
    enabled = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def log_dataset(self, *args, **kwargs) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def ui_command(self, port: int = 5000) -> str:
        return ""

    def run_url(self, port: int = 5000, tab: str = "model-metrics") -> str:
        return ""

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def make_tracker(rank: int, workdir: str | os.PathLike, experiment: str, run_name: str,
                 params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
                 resume: bool = True, system_metrics: float | None = None) -> Tracker | NullTracker:
    """A real :class:`Tracker` on rank 0, a :class:`NullTracker` on every other rank."""
    if rank != 0:
        return NullTracker()
    return Tracker.start(workdir, experiment, run_name, params=params, tags=tags, resume=resume,
                         system_metrics=system_metrics)


def plot_curves(history: Mapping[str, Iterable[tuple[int, float]]], path: str | os.PathLike,
                title: str = "", xlabel: str = "step", ylabel: str = "value",
                logy: bool = False) -> Path:
    """Write a PNG of each series (``name -> [(step, value), ...]``) against step; returns the path.

    NaN/None points are dropped; an empty series still gets a legend entry.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        for name, points in history.items():
            pts = [(int(s), f) for s, v in points if (f := _finite_or_none(v)) is not None]
            pts.sort()
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3,
                    linewidth=1.5, label=str(name))
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if history:
            ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out

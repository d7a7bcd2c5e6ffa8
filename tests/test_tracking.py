"""MLflow tracking on a tmp sqlite store: params/metrics read back, resume, env URI, no-op ranks."""
from __future__ import annotations

import os

import pytest
from mlflow import MlflowClient

from ratray import tracking
from ratray.tracking import (MAX_PARAM_VAL_LENGTH, NullTracker, Tracker, make_tracker, plot_curves,
                             tracking_uri)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: creating a store runs MLflow's migrations (~5-8 s)."""
    return tmp_path_factory.mktemp("mlflow")


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_tracking_uri_default_and_env(tmp_path, monkeypatch):
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri(tmp_path) == "sqlite:////elsewhere/x.db"
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") is not None


def test_params_metrics_read_back_and_resume(store, tmp_path):
    params = {"model": {"d_model": 64, "layers": 2, "cca": [1, 2]}, "lr": 3e-4, "name": "x",
              "long": "y" * (MAX_PARAM_VAL_LENGTH + 500)}
    t = Tracker.start(store, "exp", "run-a", params=params, tags={"kind": "retro"})
    assert (store / "mlflow.db").exists()
    t.log_metrics({"train/loss": 2.5, "val_bpb": 1.9, "skip_none": None, "skip_nan": float("nan")}, step=0)
    t.log_metrics({"train/loss": 2.0}, step=10)
    t.log_dict({"a": 1}, "summary.json")
    f = tmp_path / "note.txt"
    f.write_text("hello")
    t.log_artifact(f)
    run_id = t.run_id
    t.end()

    client = MlflowClient(tracking_uri=t.uri)
    run = client.get_run(run_id)
    p = run.data.params
    assert p["model.d_model"] == "64" and p["model.layers"] == "2" and p["model.cca"] == "[1, 2]"
    assert p["lr"] == "0.0003" and p["name"] == "x"
    assert len(p["long"]) == MAX_PARAM_VAL_LENGTH and p["long"].endswith("...")
    assert run.data.tags["kind"] == "retro" and run.data.tags[tracking.RUN_NAME_TAG] == "run-a"
    assert run.info.status == "FINISHED"
    assert _history(client, run_id, "train/loss") == [(0, 2.5), (10, 2.0)]
    assert "skip_none" not in run.data.metrics and "skip_nan" not in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "note.txt"} <= arts
    # artifacts live under the workdir, not the cwd
    assert (store / "mlartifacts").is_dir()

    # resume: same run id, metrics append, identical params re-log fine, a changed one → tag
    params2 = dict(params, lr=1e-4)
    t2 = Tracker.start(store, "exp", "run-a", params=params2)
    assert t2.run_id == run_id and t2.resumed
    assert client.get_run(run_id).info.status == "RUNNING"
    t2.log_metrics({"train/loss": 1.5}, step=20)
    t2.log_params({"new_key": 1})
    t2.end("FAILED")
    run = client.get_run(run_id)
    assert _history(client, run_id, "train/loss") == [(0, 2.5), (10, 2.0), (20, 1.5)]
    assert run.data.params["lr"] == "0.0003" and run.data.tags["resume.lr"] == "0.0001"
    assert run.data.params["new_key"] == "1"
    assert run.info.status == "FAILED"

    # resume=False starts a fresh run; another name starts a fresh run
    t3 = Tracker.start(store, "exp", "run-a", resume=False)
    t4 = Tracker.start(store, "exp", "run-b")
    assert len({run_id, t3.run_id, t4.run_id}) == 3
    assert t3.experiment_id == t2.experiment_id

    cmd = t.ui_command()
    assert "mlflow" in cmd and " ui " in cmd and f"sqlite:///{store.resolve()}/mlflow.db" in cmd
    assert "--host 127.0.0.1 --port 5000" in cmd


def test_env_uri_honoured(store, tmp_path, monkeypatch):
    uri = f"sqlite:///{store.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t = Tracker.start(tmp_path / "wd", "exp-env", "r", params={"a": 1})
    assert t.uri == uri
    t.log_metrics({"m": 1.0}, step=1)
    t.end()
    assert not (tmp_path / "wd" / "mlflow.db").exists()
    run = MlflowClient(tracking_uri=uri).get_run(t.run_id)
    assert run.data.params["a"] == "1" and run.data.metrics["m"] == 1.0


def test_null_tracker_and_make_tracker(store, tmp_path):
    nt = make_tracker(1, tmp_path, "exp", "r", params={"a": {"b": 1}})
    assert isinstance(nt, NullTracker) and nt.run_id is None
    nt.log_metrics({"x": 1.0}, step=0)
    nt.log_params({"a": 1})
    nt.set_tags({"t": 1})
    nt.log_dict({"a": 1}, "x.json")
    nt.log_artifact(tmp_path / "missing")
    nt.end("FAILED")
    assert list(tmp_path.iterdir()) == []  # no db, no artifacts
    t = make_tracker(0, store, "exp-null", "r")
    assert isinstance(t, Tracker) and t.run_id
    t.end()


def test_plot_curves(tmp_path):
    hist = {"train loss": [(0, 3.0), (10, 2.5), (20, 2.1), (30, float("nan"))],
            "val bpb RETRO on": [(10, 2.0), (20, 1.8)], "val bpb RETRO off": [(10, 2.2), (20, 2.1)]}
    out = plot_curves(hist, tmp_path / "plots" / "curves.png", title="RETRO tiny")
    data = out.read_bytes()
    assert out.stat().st_size > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"

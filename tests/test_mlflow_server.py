"""The MLflow tracking server on PostgreSQL (cluster/mlflowserver.py, `cluster/local.sh mlflow`),
and the k8s Deployment running it with the same command and settings.

The server test needs the machine's PostgreSQL (127.0.0.1:5432, trust auth; $RATRAY_POSTGRES for
another): it creates its own database ``ratray_mlflow_<pid>`` and drops it afterwards, and skips,
saying why, only when PostgreSQL is unreachable. A run is logged through ``ratray.tracking`` with
``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>`` (as jobs do on the cluster) and read back with
``MlflowClient``; the rows are checked in PostgreSQL itself and the artifact on the server's disk.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.cluster_tools import load

ROOT = Path(__file__).resolve().parents[1]
mlflowserver = load("mlflowserver")
PG = os.environ.get("RATRAY_POSTGRES", mlflowserver.DEFAULT_PG)


def _postgres_reason() -> str | None:
    """None when PostgreSQL answers at PG, else why not (the skip reason)."""
    try:
        mlflowserver.database_exists(PG, "postgres")
        return None
    except mlflowserver.ClusterError as e:
        return str(e)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _postgres_reason()
    if reason:
        pytest.skip(f"no PostgreSQL for the MLflow server test: {reason}")
    state_dir = tempfile.mkdtemp(prefix="ratray-mlf-", dir="/tmp")
    srv = mlflowserver.MlflowServer(port=_free_port(), database=f"ratray_mlflow_{os.getpid()}", pg=PG,
                                    artifacts=tmp_path_factory.mktemp("mlartifacts"), state_dir=state_dir)
    try:
        srv.up(quiet=True)
        yield srv
    finally:
        srv.down(drop_database=True, quiet=True)
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not srv.is_up() and not mlflowserver.database_exists(PG, srv.database)


def _get(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow  # ~30 s: the migration of a fresh database and the server start
def test_a_tracked_run_lands_in_postgresql_and_reads_back(server, tmp_path, monkeypatch):
    """Params, a metric history and an artifact logged through ratray.tracking over HTTP: MlflowClient
    reads them back, the run's rows are in the server's PostgreSQL database, the artifact went
    through the server into its artifacts destination, nothing was written to the workdir, and the
    image the run's description shows is served by the server."""
    import mlflow
    import psycopg

    from ratray.tracking import Tracker, plot_curves

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    workdir = tmp_path / "work"
    history = {"train/loss": [(s, 5.0 - 0.5 * s) for s in range(4)]}
    plot = plot_curves(history, tmp_path / "loss.png") or tmp_path / "loss.png"
    with Tracker.start(workdir, "ratray-services-test", "pg-run", params={"model": {"d_model": 64}, "k": 2}) as t:
        for step, loss in history["train/loss"]:
            t.log_metrics({"train/loss": loss}, step=step)
        t.log_artifact(plot, "plots")
        run_id = t.run_id

    client = mlflow.MlflowClient(tracking_uri=server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pg-run"
    assert run.data.params == {"model.d_model": "64", "k": "2"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == history["train/loss"]
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss.png"]
    got = Path(client.download_artifacts(run_id, "plots/loss.png", str(tmp_path / "dl")))
    assert got.read_bytes() == Path(plot).read_bytes()
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served, not a client-side path
    on_disk = list(server.artifacts.rglob("loss.png"))
    assert len(on_disk) == 1 and on_disk[0].read_bytes() == Path(plot).read_bytes()
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()
    # what the UI shows: a model-training experiment, the plot in the run's description, served
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    src = f"get-artifact?path=plots%2Floss.png&run_uuid={run_id}"
    assert f"]({src})" in run.data.tags["mlflow.note.content"]
    with urllib.request.urlopen(f"{server.url}/{src}", timeout=30) as r:
        assert r.read() == Path(plot).read_bytes()

    with psycopg.connect(mlflowserver.backend_uri(PG, server.database)) as conn:
        rows = conn.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (run_id,)).fetchall()
        n_metrics = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)).fetchone()[0]
    assert rows == [("pg-run", "FINISHED")] and n_metrics == 4


@pytest.mark.slow
def test_the_server_accepts_only_its_exact_host_names(server):
    api = server.url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(api, f"127.0.0.1:{server.port}") == 200
    assert _get(api, f"localhost:{server.port}") == 200
    for host in ("evil.example", f"evil.example:{server.port}", f"127.0.0.1.evil.example:{server.port}"):
        assert _get(api, host) == 403, host


def test_local_sh_mlflow_reports_a_server_that_is_not_up():
    port = _free_port()
    r = subprocess.run([str(ROOT / "cluster" / "local.sh"), "mlflow", "status", "--port", str(port)],
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and '"up": false' in r.stdout, r.stdout + r.stderr


def test_an_unreachable_postgresql_is_one_clear_error(tmp_path):
    srv = mlflowserver.MlflowServer(port=_free_port(), database="ratray_mlflow_unreachable",
                                    pg=f"postgresql://127.0.0.1:{_free_port()}", state_dir=tmp_path / "s")
    with pytest.raises(mlflowserver.ClusterError, match=r"PostgreSQL at postgresql://127\.0\.0\.1:\d+ is unreachable"):
        srv.up(quiet=True)


# ---------------------------------------------------------------------------------------------
# the k8s Deployment runs the same server


def _deployment() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow" / "mlflow.yaml").read_text()))
    (dep,) = [d for d in docs if d and d["kind"] == "Deployment"]
    return dep["spec"]["template"]["spec"]


def _mismatches(spec: dict) -> list[str]:
    """How the Deployment's pod spec differs from the local server: the container's args must be
    server_args() for its host/port/volume, the shared settings the same values, the backend store
    PostgreSQL, and an init container must run UPGRADE_COMMAND (the schema migration) with the same
    image, credentials and backend URI before the server starts."""
    out = []
    (c,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}.get("artifacts")
    if c.get("args") != mlflowserver.server_args("0.0.0.0", 5000, mount):
        out.append(f"server args {c.get('args')}")
    missing = set(mlflowserver.server_env("postgresql://h/db", ["x"], 2)) - set(env)
    if missing:
        out.append(f"server env lacks {sorted(missing)}")
    out += [f"{k}={env.get(k)!r}" for k, v in mlflowserver.SHARED_ENV.items() if env.get(k) != v]
    if not str(env.get("MLFLOW_BACKEND_STORE_URI")).startswith("postgresql://"):
        out.append("backend store is not PostgreSQL")
    inits = [i for i in spec.get("initContainers", []) if i.get("command") == mlflowserver.UPGRADE_COMMAND]
    if not inits:
        return out + ["no init container runs the schema migration (mlflow db upgrade)"]
    init_env = {e["name"]: e.get("value") for e in inits[0]["env"]}
    if inits[0]["image"] != c["image"]:
        out.append("db-upgrade runs another image")
    if init_env.get("MLFLOW_BACKEND_STORE_URI") != env.get("MLFLOW_BACKEND_STORE_URI"):
        out.append("db-upgrade migrates another database")
    if [e for e in inits[0]["env"] if e["name"].startswith("POSTGRES_")] != \
            [e for e in c["env"] if e["name"].startswith("POSTGRES_")]:
        out.append("db-upgrade has other credentials")
    return out


def test_k8s_mlflow_runs_the_local_servers_command_and_settings():
    assert _mismatches(_deployment()) == []


def _no_migration(spec):
    spec.pop("initContainers")


def _no_serve_artifacts(spec):
    spec["containers"][0]["args"].remove("--serve-artifacts")


def _other_db(spec):
    spec["initContainers"][0]["env"][3]["value"] = "postgresql://x@ratray-postgres:5432/other"


def _job_execution_on(spec):
    next(e for e in spec["containers"][0]["env"] if e["name"] == "MLFLOW_SERVER_ENABLE_JOB_EXECUTION")["value"] = "true"


@pytest.mark.parametrize("mutate, problem", [
    (_no_migration, "no init container runs the schema migration"),
    (_no_serve_artifacts, "server args"),
    (_other_db, "db-upgrade migrates another database"),
    (_job_execution_on, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION='true'"),
], ids=["no-db-upgrade", "no-serve-artifacts", "other-database", "job-execution"])
def test_the_comparison_catches_a_manifest_that_drifts(mutate, problem):
    spec = _deployment()
    mutate(spec)
    assert any(problem in m for m in _mismatches(spec)), _mismatches(spec)

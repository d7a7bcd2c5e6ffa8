"""The MLflow tracking server run locally the way k8s/base/mlflow runs it: PostgreSQL backend store.

    cluster/local.sh mlflow up [--port 5050] [--database ratray_mlflow] [--artifacts DIR]
    cluster/local.sh mlflow status | down [--drop-database]
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5050   # then run jobs as usual
    (tooling outside the ratray package, like cluster/localray.py; needs the `server` extra:
    psycopg 3, the driver SQLAlchemy 2.1 uses for ``postgresql://``)

Data flow of ``up``:

1. ``CREATE DATABASE <database>`` on the PostgreSQL server ``--pg`` (default
   ``postgresql://127.0.0.1:5432``, connecting to its maintenance database ``test``) when missing;
   nothing else on that server is touched (it is the machine's, shared with others).
2. ``mlflow db upgrade <backend uri>`` (:data:`UPGRADE_COMMAND`): creates or migrates MLflow's
   schema (the k8s Deployment runs the same command in its ``db-upgrade`` init container).
3. ``mlflow server`` with exactly :func:`server_args` and :func:`server_env` (the same flags and
   settings as the k8s Deployment; tests/test_mlflow_server.py compares them): artifacts uploaded
   through the server (``--serve-artifacts``) into ``--artifacts-destination``, bound to 127.0.0.1,
   ``MLFLOW_SERVER_ALLOWED_HOSTS`` the exact host:port names clients use. The backend URI reaches
   the server in ``MLFLOW_BACKEND_STORE_URI`` (out of the process arguments, as on k8s).
4. Waits for ``/health``; state (pid, port, database, artifacts) in
   ``/tmp/ratray-mlflow-<port>/ratray_mlflow.json`` (folder 0700, checked like the Ray head's).

``down`` stops the server's process group (SIGTERM, then SIGKILL) and, with ``--drop-database``,
drops its database. The sqlite store stays the embedded default for ``make demo``: this server is
used only when ``MLFLOW_TRACKING_URI`` points at it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localray import ClusterError, _alive, check_state_dir, port_busy  # noqa: E402

DEFAULT_PORT = 5050  # not MLflow's 5000 (often taken by other tools)
DEFAULT_PG = "postgresql://127.0.0.1:5432"
MAINTENANCE_DB = "test"  # the database we connect to for CREATE/DROP DATABASE
DEFAULT_DATABASE = "ratray_mlflow"
STATE_FILE = "ratray_mlflow.json"
# Settings shared with the k8s Deployment (k8s/base/mlflow/mlflow.yaml), one home.
SHARED_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job runner processes
              "MLFLOW_DISABLE_TELEMETRY": "true"}


# `mlflow db upgrade <MLFLOW_BACKEND_STORE_URI>` with the URI (and any password) read from the
# environment, not the process arguments: the k8s init container `db-upgrade` runs exactly this.
UPGRADE_COMMAND = ["python", "-c", "import os, sys; from mlflow.cli import cli; sys.argv = "
                   "['mlflow', 'db', 'upgrade', os.environ['MLFLOW_BACKEND_STORE_URI']]; cli()"]


def backend_uri(pg: str, database: str) -> str:
    """``postgresql://host:port/<database>`` from the server URI ``pg`` (user/password kept)."""
    return f"{pg.rstrip('/')}/{database}"


def server_args(host: str, port: int, artifacts: str) -> list[str]:
    """The arguments after ``mlflow server`` (the k8s container's ``args``)."""
    return [f"--host={host}", f"--port={port}", "--serve-artifacts", f"--artifacts-destination={artifacts}"]


def server_env(backend: str, allowed_hosts: list[str], workers: int) -> dict[str, str]:
    """The server's environment beyond ours (the k8s container's ``env``)."""
    return {"MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_SERVER_ALLOWED_HOSTS": ",".join(allowed_hosts),
            "MLFLOW_WORKERS": str(int(workers)), **SHARED_ENV}


def healthy(url: str) -> bool:
    """True when the MLflow server or UI at `url` answers ``/health`` with 200."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _pg_exec(pg: str, sql: str, args: tuple = ()) -> list:
    try:
        import psycopg
    except ImportError as e:
        raise ClusterError("the PostgreSQL driver is missing: pip install -e '.[server]' (psycopg 3)") from e
    try:
        conn = psycopg.connect(backend_uri(pg, MAINTENANCE_DB), connect_timeout=5)
    except psycopg.OperationalError as e:
        raise ClusterError(f"PostgreSQL at {pg} is unreachable: {str(e).strip()}") from e
    conn.autocommit = True  # CREATE/DROP DATABASE refuse to run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def database_exists(pg: str, database: str) -> bool:
    return bool(_pg_exec(pg, "SELECT 1 FROM pg_database WHERE datname = %s", (database,)))


def _check_name(database: str) -> str:
    if not database.replace("_", "").isalnum() or database[0].isdigit() or database == MAINTENANCE_DB:
        raise ClusterError(f"database name {database!r}: use letters, digits and _ (not {MAINTENANCE_DB!r})")
    return database


class MlflowServer:
    """One local MLflow tracking server on PostgreSQL. See the module docstring."""

    def __init__(self, port: int = DEFAULT_PORT, database: str = DEFAULT_DATABASE, pg: str = DEFAULT_PG,
                 artifacts: str | os.PathLike | None = None, state_dir: str | os.PathLike | None = None,
                 python: str | None = None, workers: int = 1):
        self.port, self.pg, self.workers = int(port), pg, int(workers)
        self.database = _check_name(database)
        self.state_dir = Path(state_dir or Path(tempfile.gettempdir()) / f"ratray-mlflow-{self.port}")
        self.artifacts = Path(artifacts or self.state_dir / "mlartifacts").resolve()
        self.python = python or sys.executable
        check_state_dir(self.state_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend(self) -> str:
        return backend_uri(self.pg, self.database)

    @property
    def allowed_hosts(self) -> list[str]:
        """Exactly the Host headers of this server's clients: 127.0.0.1:P and localhost:P."""
        return [f"127.0.0.1:{self.port}", f"localhost:{self.port}"]

    def _mlflow(self) -> str:
        exe = Path(self.python).with_name("mlflow")
        return str(exe) if exe.exists() else "mlflow"

    def read_state(self) -> dict | None:
        check_state_dir(self.state_dir)
        try:
            return json.loads((self.state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None

    def is_up(self) -> bool:
        s = self.read_state()
        return bool(s) and _alive(s["pid"], s.get("create_time"))

    def _healthy(self) -> bool:
        return healthy(self.url)

    def up(self, timeout: float = 180.0, quiet: bool = False) -> str:
        """Create the database if missing, migrate its schema, start the server; returns its URL."""
        import psutil

        if self.is_up():
            return self.url
        if port_busy(self.port):
            raise ClusterError(f"port {self.port} is already in use by another process: choose another --port")
        t0 = time.time()
        if not database_exists(self.pg, self.database):
            _pg_exec(self.pg, f'CREATE DATABASE "{self.database}"')
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_state_dir(self.state_dir)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **server_env(self.backend, self.allowed_hosts, self.workers)}
        log_path = self.state_dir / "mlflow_server.log"
        r = subprocess.run([self.python, *UPGRADE_COMMAND[1:]], env=env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise ClusterError(f"`mlflow db upgrade` failed (rc={r.returncode}): {r.stderr.strip()[-2000:]}")
        with open(log_path, "w") as logf:
            proc = subprocess.Popen([self._mlflow(), "server", *server_args("127.0.0.1", self.port, str(self.artifacts))],
                                    env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        state = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "port": self.port,
                 "database": self.database, "pg": self.pg, "artifacts": str(self.artifacts), "url": self.url}
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
        while not self._healthy():
            if proc.poll() is not None or time.time() - t0 > timeout:
                self.down(quiet=True)
                raise ClusterError(f"mlflow server did not become healthy; log {log_path}:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        if not quiet:
            print(f"ratray: MLflow server up in {time.time() - t0:.1f}s: {self.url} "
                  f"(backend PostgreSQL database {self.database}, artifacts {self.artifacts})", file=sys.stderr)
        return self.url

    def down(self, drop_database: bool = False, grace: float = 10.0, quiet: bool = False) -> bool:
        """Stop the server's process group; drop its database when asked. True if a server ran."""
        state = self.read_state()
        ran = bool(state) and _alive(state["pid"], state.get("create_time"))
        if ran:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(state["pid"], sig)  # the server's own session: its workers too
                except ProcessLookupError:
                    break
                deadline = time.time() + wait
                while time.time() < deadline and port_busy(self.port):
                    time.sleep(0.2)
                if not port_busy(self.port):
                    break
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        if drop_database and database_exists(self.pg, self.database):
            _pg_exec(self.pg, f'DROP DATABASE "{self.database}" WITH (FORCE)')
        if not quiet:
            print(f"ratray: MLflow server on port {self.port} " + ("stopped" if ran else "was not running")
                  + (f"; database {self.database} dropped" if drop_database else ""), file=sys.stderr)
        return ran

    def status(self) -> dict:
        state = self.read_state() or {}
        up = self.is_up()
        return {"up": up, "healthy": up and self._healthy(), "url": self.url if up else None,
                "port": self.port, "database": state.get("database", self.database),
                "artifacts": state.get("artifacts", str(self.artifacts))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cluster/local.sh mlflow",
                                 description="A local MLflow tracking server on PostgreSQL (see module docstring).")
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--port", type=int, default=int(os.environ.get("RATRAY_MLFLOW_PORT", DEFAULT_PORT)))
    ap.add_argument("--database", default=os.environ.get("RATRAY_MLFLOW_DATABASE", DEFAULT_DATABASE))
    ap.add_argument("--pg", default=os.environ.get("RATRAY_POSTGRES", DEFAULT_PG),
                    help="PostgreSQL server URI without database")
    ap.add_argument("--artifacts", default=None, help="artifacts destination (default: in the state folder)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--drop-database", action="store_true", help="down: also DROP the server's database")
    args = ap.parse_args(argv)
    try:
        srv = MlflowServer(port=args.port, database=args.database, pg=args.pg, artifacts=args.artifacts,
                           workers=args.workers)
        if args.command == "up":
            print(srv.up())
            return 0
        if args.command == "down":
            srv.down(drop_database=args.drop_database)
            return 0
        info = srv.status()
        print(json.dumps(info, indent=1))
        return 0 if info["up"] else 3
    except ClusterError as e:
        print(f"ratray: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

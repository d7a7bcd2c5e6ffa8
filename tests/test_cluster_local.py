"""cluster/localray.py (run by cluster/local.sh): a real `ray start --head` on non-default ports +
`ray job submit`, with and without a token file, and the wrapper script's CLI.

HOME points at a tmp dir in both cases (Ray reads the token from $HOME/.ray/auth_token), so the
test behaves the same on every machine and never touches the real ~/.ray. The head uses its own
--temp-dir, so the suite's `ray.init()` session (and anyone else's Ray) is unaffected, and `down()`
stops only this head's processes (never `ray stop`).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_localray():
    """cluster/localray.py is tooling outside the ratray package: loaded from its file, the way
    cluster/local.sh runs it."""
    spec = importlib.util.spec_from_file_location("localray", ROOT / "cluster" / "localray.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


localray = _load_localray()
LocalRay, port_busy, ray_exe = localray.LocalRay, localray.port_busy, localray.ray_exe


def _free_ports(base: int) -> tuple[int, int]:
    """A GCS port p with p, p+1, p+2 free and a free dashboard port, searched from `base`."""
    for p in range(base, base + 200, 7):
        d = p + 2000
        if not any(port_busy(x) for x in (p, p + 1, p + 2, d)):
            return p, d
    pytest.skip("no free port block for a test Ray head")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_local_sh_runs_the_cli_and_reports_a_head_that_is_not_up(tmp_path):
    """cluster/local.sh reaches cluster/localray.py's CLI: `status` of a port with no head started
    prints the JSON status and exits 3; an unknown subcommand is refused by the parser (exit 2)."""
    port = next(p for p in range(6700, 6900, 7) if not Path(tempfile.gettempdir(), f"ratray-ray-{p}").exists())
    env = {**os.environ, "PYTHON": sys.executable, "RATRAY_RAY_PORT": str(port), "HOME": str(tmp_path)}
    script = str(ROOT / "cluster" / "local.sh")
    r = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["up"] is False and info["port"] == port and info["auth"] == "token"
    r = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: 'start'" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("token_exists", [False, True], ids=["no-token-file", "token-file"])
def test_local_head_submit_and_down(tmp_path, token_exists):
    home = tmp_path / "home"
    token_file = home / ".ray" / "auth_token"
    if token_exists:
        token_file.parent.mkdir(parents=True)
        token_file.write_text("0123456789abcdef0123456789abcdef")
    port, dash = _free_ports(6410 if not token_exists else 6510)
    # Ray's unix socket paths must stay < 108 bytes: pytest's tmp_path is too deep for --temp-dir
    ray_tmp = tempfile.mkdtemp(prefix="ratray-t-", dir="/tmp")
    lr = LocalRay(port=port, dashboard_port=dash, temp_dir=ray_tmp, extra_env={"HOME": str(home)})
    try:
        addr = lr.up(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        assert addr == f"http://127.0.0.1:{dash}" and lr.is_up()
        assert lr.up(num_cpus=1) == addr  # idempotent: reuses the running head
        gcs_pid = lr.read_state()["gcs_pid"]
        # policy: token auth always on; a token was generated only when missing
        assert token_file.is_file() and token_file.read_text().strip()
        if token_exists:
            assert token_file.read_text() == "0123456789abcdef0123456789abcdef"
        assert lr.env() == {"RAY_ADDRESS": addr, "RAY_API_SERVER_ADDRESS": addr,
                            "RAY_AUTH_MODE": "token"}
        # the job API refuses a request without the token ...
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(addr + "/api/jobs/", timeout=10)
        assert e.value.code == 401

        if token_exists:
            # ... and so does `ray job` without RAY_AUTH_MODE=token (the Ray default client mode);
            # with env() (RAY_AUTH_MODE=token) the CLI authenticates with the existing token file.
            # The job itself runs in the other case only (same code path; keeps the file < 90 s).
            ray = ray_exe(lr.python)
            env = {k: v for k, v in lr.base_env().items() if k != "RAY_AUTH_MODE"}
            r = subprocess.run([ray, "job", "list", f"--address={addr}"], env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "authentication token" in (r.stdout + r.stderr)
            r = subprocess.run([ray, "job", "list"], env={**lr.base_env(), **lr.env()},
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert lr.list_jobs() == []
        else:
            wd = tmp_path / "job"
            wd.mkdir()
            (wd / "hello.py").write_text(
                "import ray\nray.init()\nprint('RESOURCES', ray.cluster_resources())\n")
            out = io.StringIO()
            job_id, status = lr.submit(["python", "hello.py"], working_dir=wd, stream=out)
            assert status == "SUCCEEDED", out.getvalue()[-3000:]
            assert "RESOURCES" in out.getvalue()  # streamed
            logs = lr.job_logs(job_id)
            assert "RESOURCES" in logs and "'CPU': 1.0" in logs
            assert any(j["submission_id"] == job_id for j in lr.list_jobs())
    finally:
        pids = lr.processes()
        lr.down(grace=6.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert pids and gcs_pid in pids
    assert lr.processes() == [] and not lr.is_up()
    assert [p for p in pids if _running(p)] == []
    assert not port_busy(port) and not port_busy(dash)
    assert lr.down() == 0  # second down is a no-op

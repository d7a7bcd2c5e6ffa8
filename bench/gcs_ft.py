"""How long a running job stalls when the GCS is killed, on a local head with its GCS state in Redis.

    python bench/gcs_ft.py [--kills 3] [--gap 4] [--redis 127.0.0.1:6379] [--port 6660]

One local head (cluster/local.sh up --gcs-ft: GCS state in Redis under its own namespace, the keeper
restarting a dead gcs_server); cluster/gcsft.PROBE calls two named actors every 20 ms and makes a
GCS request (ray.nodes()) after each call. The gcs_server is SIGKILLed ``--kills`` times,
``--gap`` seconds apart. Printed side by side, calm (no kill within 1 s before) vs. the window
of each kill (the calls that began in the 3 s after it): median and longest actor round-trip and GCS
request, and the calls lost (answers out of order). The head and its Redis keys are removed after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
import gcsft  # noqa: E402
import localray  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--gap", type=float, default=4.0)
    ap.add_argument("--redis", default=os.environ.get("RATRAY_REDIS_ADDRESS", "127.0.0.1:6379"))
    ap.add_argument("--port", type=int, default=6660)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ratray-bft-", dir="/tmp")
    lr = localray.LocalRay(port=args.port, dashboard_port=args.port + 2000, temp_dir=tmp, auth="disabled",
                           extra_env={"HOME": tmp})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    kills: list[float] = []
    try:
        lr.up(num_cpus=1, object_store_memory=80 * 1024 * 1024, gcs_ft=args.redis, quiet=True)
        out = Path(tmp, "probe.out")
        seconds = 3 + args.kills * args.gap + 3
        with open(out, "w") as fo:
            probe = subprocess.Popen([sys.executable, "-c", gcsft.PROBE, lr.gcs_address, str(seconds)], env=env,
                                     stdout=fo, stderr=subprocess.DEVNULL, text=True)
        while "READY" not in out.read_text():
            if probe.poll() is not None:
                raise SystemExit("the probe driver died before its actors answered")
            time.sleep(0.2)
        time.sleep(3)
        for _ in range(args.kills):
            kills.append(time.time())
            os.kill(lr.read_state()["gcs_pid"], signal.SIGKILL)
            time.sleep(args.gap)
        probe.wait(timeout=seconds + 120)
        calls = json.loads(out.read_text().split("CALLS ", 1)[1])
        restarts = lr.read_state().get("gcs_restarts", [])
    finally:
        lr.down(grace=6.0, quiet=True)
        shutil.rmtree(tmp, ignore_errors=True)
    lost = sum(1 for i, c in enumerate(calls) if c[2] != [i + 2, i + 2])
    calm = [c for c in calls if not any(k - 1 <= c[0] <= k + 3 for k in kills)]
    hit = [c for c in calls if any(k <= c[0] <= k + 3 for k in kills) or any(c[0] < k < c[1] + c[3] for k in kills)]

    def row(name, cs):
        trip, gcs = [c[1] - c[0] for c in cs], [c[3] for c in cs]
        return (f"{name:<22}{len(cs):>7}{statistics.median(trip) * 1e3:>12.1f}{max(trip) * 1e3:>12.1f}"
                f"{statistics.median(gcs) * 1e3:>12.1f}{max(gcs) * 1e3:>12.1f}")

    print(f"GCS fault tolerance, Redis {args.redis}: {len(kills)} SIGKILLs of gcs_server, "
          f"{len(restarts)} restarts by the keeper, {len(calls)} calls, {lost} lost")
    print(f"{'window':<22}{'calls':>7}{'trip med ms':>12}{'trip max ms':>12}{'gcs med ms':>12}{'gcs max ms':>12}")
    print(row("calm", calm))
    print(row("3 s after each kill", hit))
    return 0 if lost == 0 and len(restarts) == len(kills) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# A local Ray head for the demo and the README (thin wrapper over cluster/localray.py), alone or
# with worker nodes shaped like the KubeRay groups (a multi-node cluster on this host).
#
#   cluster/local.sh up [--num-cpus 2] [--port 6390] [--dashboard-port 8265] [--auth token|disabled] [--gcs-ft [REDIS]]
#   cluster/local.sh up --nodes "train:2 index:2x2"   # GROUP:CPUS[xCOUNT] or a YAML file; head: no work
#   cluster/local.sh submit [--working-dir .] [--no-wait] -- python jobs/build_index.py --workdir work
#   cluster/local.sh status            # JSON: up?, addresses, auth, jobs, nodes (exit 3 when down)
#   cluster/local.sh logs JOB_ID
#   cluster/local.sh kill-node index-0 # SIGKILL one worker node (raylet first): a lost pod
#   eval "$(cluster/local.sh env)"     # RAY_ADDRESS / RAY_AUTH_MODE for plain `ray job ...` commands
#   cluster/local.sh down              # stops only this head and its nodes (never `ray stop`, which stops every Ray)
#   cluster/local.sh mlflow up|status|down [--port 5050] [--drop-database]  # MLflow on PostgreSQL
#
# The head always runs with Ray token auth (a token is generated in ~/.ray/auth_token if missing)
# and listens on 127.0.0.1 only; its state folder /tmp/ratray-ray-<port> must be yours and not
# writable by others. See the docstring of cluster/localray.py for why and for the ports it uses.
# RATRAY_RAY_PORT / RATRAY_RAY_DASHBOARD_PORT change the default ports; PYTHON the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "cluster/local.sh: $PY not found; run 'make venv' first (or set PYTHON=...)" >&2
  exit 2
fi
if [[ $# -lt 1 ]]; then
  sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the head's processes import ratray from here
if [[ "$1" == "mlflow" ]]; then  # the MLflow tracking server on PostgreSQL (cluster/mlflowserver.py)
  shift
  exec "$PY" "$ROOT/cluster/mlflowserver.py" "$@"
fi
exec "$PY" "$ROOT/cluster/localray.py" "$@"

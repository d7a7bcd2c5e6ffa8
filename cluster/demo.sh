#!/usr/bin/env bash
# `make demo`: a local single-node Ray head, the index build, the RETRO job and its evaluation
# submitted with `ray job submit`, progress streamed, the report printed (RETRO[ON] vs RETRO[OFF]
# with 95% intervals, bpb by overlap, the database-size curve), and the Ray it started stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${WORKDIR:-$PWD/work}"
CONFIG="${CONFIG:-configs/demo.yaml}"
RUN_NAME="${RUN_NAME:-retro-demo}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"

started=0
cleanup() { if [ "$started" = 1 ]; then echo "== stopping the local Ray head"; cluster/local.sh down || true; fi; }
trap cleanup EXIT

echo "== starting a local Ray head (GCS on 127.0.0.1:${RATRAY_RAY_PORT:-6390}, not Redis's 6379; job API on 127.0.0.1:8265, token auth)"
cluster/local.sh up --num-cpus "$(nproc)"
started=1

echo "== building the chunk store, embeddings and index (reused when unchanged)"
cluster/local.sh submit --working-dir . -- python jobs/build_index.py --workdir "$WORKDIR" --config "$CONFIG" --quiet

echo "== training RETRO (Ray Train + DeepSpeed workers, online retrieval from the shard actors)"
cluster/local.sh submit --working-dir . -- python jobs/retro_pretrain.py --workdir "$WORKDIR" --config "$CONFIG" --run-name "$RUN_NAME" --quiet

echo "== evaluating: RETRO[ON] vs RETRO[OFF] on every validation document, 95% bootstrap intervals"
cluster/local.sh submit --working-dir . -- python jobs/evaluate.py --workdir "$WORKDIR" --run-name "$RUN_NAME" --quiet
echo "report: $WORKDIR/runs/$RUN_NAME/eval/report.md (plots next to it, and in the run's MLflow record)"

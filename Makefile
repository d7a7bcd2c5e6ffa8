# ratray — one entry point. `make test` and `make demo` work on a fresh clone:
# they create (or refresh) .venv from pyproject.toml + constraints.txt, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRA ?= cpu
STAMP := $(VENV)/.ratray-installed-$(EXTRA)
WORKDIR ?= work
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export OMP_WAIT_POLICY ?= PASSIVE
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: venv test cluster-test demo realm-demo build-index bench chaos ui-check mlflow-demo lock clean

venv: $(STAMP)

# Reinstall whenever the package definition or the pins change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRA),server,dev]"
	@rm -f $(VENV)/.ratray-installed-*
	@touch $@

# Two pytest workers (pytest-xdist, --dist loadfile: a file's tests on one worker, so a module
# fixture is built once): a third of the suite's time on one process is waiting (Ray heads
# starting, actors restarting, a killed GCS coming back), which the other worker fills. Each worker
# is a pytest session with its own local Ray. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 \
		$(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# A local Ray head (GCS on 127.0.0.1:6390, off Redis's 6379; RATRAY_RAY_PORT for another), the
# index build and the RETRO job through `ray job submit`, the result printed.
demo: venv
	bash cluster/demo.sh

# REALM on the interpreter's facts: learned retriever, index refreshed every 40 steps (~14 min on 2 cores).
realm-demo: venv
	$(PY) jobs/realm_pretrain.py --workdir $(WORKDIR) --config configs/realm_knowledge.yaml

# Build the chunk store, embeddings and a sharded index over a capped stdlib corpus.
build-index: venv
	$(PY) jobs/build_index.py --workdir $(WORKDIR) --set corpus.max_docs=150

# The chaos suite (bench/chaos.py): real runs through Ray while shards, Ray Train workers, the
# RefreshService, builds and a GCS (head with its state in Redis) are killed; a JSON report per
# scenario in chaos.json; then the GCS tests (also in `make test`: RETRO training through a GCS
# kill, the same kill without Redis) and the one kept out of it (a SIGKILLed Ray Train worker,
# RATRAY_CHAOS=1). ~35 min on 2 cores.
chaos: venv
	$(PY) bench/chaos.py --out chaos.json
	RATRAY_CHAOS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_train_retry.py tests/test_gcs_ft.py

# Just the multi-node rehearsal on this host (also in `make test`): ray.cluster_utils.Cluster in a
# child process (a head without CPUs, a train node, two index nodes; an index node removed
# mid-search; a Ray Train run on it; an index node removed while RETRO trains with online
# retrieval; a training node lost mid-run) and `cluster/local.sh up --nodes` started, probed and
# stopped. 3 min 50 s alone on 2 cores (2026-12-02).
cluster-test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/test_multinode.py \
		tests/test_cluster_local.py::test_local_cluster_with_nodes_places_shards_on_index_nodes_and_down_stops_every_process

# The MLflow UI in a real browser: a 1-worker RETRO run (built, trained, evaluated), `mlflow ui` on
# its store, headless Chromium (Debian's chromium, installed here when missing) on the run's pages;
# screenshots and uicheck.json in ui-check/. 88 s on 2 cores (2026-12-02), plus installing chromium.
ui-check: venv
	@command -v chromium >/dev/null || apt-get install -y chromium || sudo apt-get install -y chromium
	RATRAY_UI_CHECK=1 RATRAY_UI_CHECK_OUT=$(CURDIR)/ui-check $(PY) -m pytest -q -p no:cacheprovider -s tests/test_mlflow_ui.py

# A RETRO and a REALM run logged through the MLflow server on PostgreSQL (own database, dropped
# after), read back with MlflowClient and opened in Chromium. ~15 min on 2 cores.
mlflow-demo: venv
	$(PY) cluster/mlflowdemo.py --workdir $(CURDIR)/work-mlflowdemo --ui-check $(CURDIR)/ui-check/server

bench: venv
	$(PY) bench/index_qps.py
	$(PY) bench/refresh.py

# Re-freeze the pins from the current venv.
lock:
	$(PY) -m pip freeze | grep -v '^-e' | grep -vi '^ratray' | sed 's/^torch==\(.*\)+cpu/torch==\1/' > /tmp/ratray-freeze
	{ head -3 constraints.txt; cat /tmp/ratray-freeze; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache

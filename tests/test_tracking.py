"""MLflow tracking on a tmp sqlite store: params/metrics read back, resume, env URI, no-op ranks."""
from __future__ import annotations

import json
import os
import shutil
import time
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from ratray import tracking
from ratray.mlflow_view import EXPERIMENT_KIND_TAG, MODEL_TRAINING, NOTE_TAG, headline, store_dataset
from ratray.tracking import (MAX_PARAM_VAL_LENGTH, NullTracker, Tracker, make_tracker, plot_curves,
                             tracking_uri)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def no_env_uri():
    """_no_env_uri for module-scoped fixtures (they are set up before any function-scoped one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: creating a store runs MLflow's migrations (~5-8 s)."""
    return tmp_path_factory.mktemp("mlflow")


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_tracking_uri_default(tmp_path):
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_tracking_uri_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri(tmp_path) == "sqlite:////elsewhere/x.db"


def test_mlflow_telemetry_is_disabled():
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") is not None


# ---------------------------------------------------------------------------------------------
# one run, then resumed, then fresh runs of the same name (each stage read back once, in order)

PARAMS = {"model": {"d_model": 64, "layers": 2, "cca": [1, 2]}, "lr": 3e-4, "name": "x",
          "long": "y" * (MAX_PARAM_VAL_LENGTH + 500)}


@pytest.fixture(scope="module")
def run_a(store, tmp_path_factory, no_env_uri):
    """Run "run-a": params, metrics (two steps; a None and a NaN), a dict and a file artifact; ended."""
    t = Tracker.start(store, "exp", "run-a", params=PARAMS, tags={"kind": "retro"})
    db_after_start = (store / "mlflow.db").exists()
    t.log_metrics({"train/loss": 2.5, "val_bpb": 1.9, "skip_none": None, "skip_nan": float("nan")}, step=0)
    t.log_metrics({"train/loss": 2.0}, step=10)
    t.log_dict({"a": 1}, "summary.json")
    f = tmp_path_factory.mktemp("note") / "note.txt"
    f.write_text("hello")
    t.log_artifact(f)
    t.end()
    client = MlflowClient(tracking_uri=t.uri)
    return SimpleNamespace(tracker=t, run_id=t.run_id, client=client, db_after_start=db_after_start,
                           run=client.get_run(t.run_id), loss=_history(client, t.run_id, "train/loss"),
                           artifacts={a.path for a in client.list_artifacts(t.run_id)})


@pytest.fixture(scope="module")
def resumed(store, run_a, no_env_uri):
    """run-a resumed with lr changed: one more metric step and a new param; ended FAILED."""
    t2 = Tracker.start(store, "exp", "run-a", params=dict(PARAMS, lr=1e-4))
    status_while_running = run_a.client.get_run(run_a.run_id).info.status
    t2.log_metrics({"train/loss": 1.5}, step=20)
    t2.log_params({"new_key": 1})
    t2.end("FAILED")
    return SimpleNamespace(tracker=t2, status_while_running=status_while_running,
                           run=run_a.client.get_run(run_a.run_id),
                           loss=_history(run_a.client, run_a.run_id, "train/loss"))


@pytest.fixture(scope="module")
def fresh(store, resumed, no_env_uri):
    """After the resume: run-a with resume=False, and run-b."""
    return Tracker.start(store, "exp", "run-a", resume=False), Tracker.start(store, "exp", "run-b")


def test_start_creates_the_sqlite_store(run_a):
    assert run_a.db_after_start


def test_nested_params_are_flattened(run_a):
    p = run_a.run.data.params
    assert p["model.d_model"] == "64" and p["model.layers"] == "2" and p["model.cca"] == "[1, 2]"


def test_scalar_params_read_back(run_a):
    p = run_a.run.data.params
    assert p["lr"] == "0.0003" and p["name"] == "x"


def test_long_param_values_are_truncated(run_a):
    p = run_a.run.data.params
    assert len(p["long"]) == MAX_PARAM_VAL_LENGTH and p["long"].endswith("...")


def test_tags_and_run_name_tag(run_a):
    tags = run_a.run.data.tags
    assert tags["kind"] == "retro" and tags[tracking.RUN_NAME_TAG] == "run-a"


def test_ended_run_is_finished(run_a):
    assert run_a.run.info.status == "FINISHED"


def test_metric_history_reads_back(run_a):
    assert run_a.loss == [(0, 2.5), (10, 2.0)]


def test_none_and_nan_metrics_are_skipped(run_a):
    metrics = run_a.run.data.metrics
    assert "skip_none" not in metrics and "skip_nan" not in metrics


def test_dict_and_file_artifacts_are_logged(run_a):
    assert {"summary.json", "note.txt"} <= run_a.artifacts


def test_artifacts_live_under_the_workdir(store, run_a):
    assert (store / "mlartifacts").is_dir()  # artifacts live under the workdir, not the cwd


def test_ui_command(store, run_a):
    cmd = run_a.tracker.ui_command()
    assert "mlflow" in cmd and " ui " in cmd and f"sqlite:///{store.resolve()}/mlflow.db" in cmd
    assert "--host 127.0.0.1 --port 5000" in cmd


def test_resume_continues_the_run(run_a, resumed):
    assert resumed.tracker.run_id == run_a.run_id and resumed.tracker.resumed


def test_resumed_run_is_running_again(resumed):
    assert resumed.status_while_running == "RUNNING"


def test_end_records_the_given_status(resumed):
    assert resumed.run.info.status == "FAILED"


def test_resumed_metrics_append(resumed):
    assert resumed.loss == [(0, 2.5), (10, 2.0), (20, 1.5)]


def test_changed_param_on_resume_is_kept_and_tagged(resumed):
    assert resumed.run.data.params["lr"] == "0.0003" and resumed.run.data.tags["resume.lr"] == "0.0001"


def test_new_params_are_logged_on_resume(resumed):
    assert resumed.run.data.params["new_key"] == "1"


def test_resume_false_and_another_name_start_fresh_runs(run_a, fresh):
    t3, t4 = fresh
    assert len({run_a.run_id, t3.run_id, t4.run_id}) == 3


def test_fresh_run_is_in_the_same_experiment(resumed, fresh):
    assert fresh[0].experiment_id == resumed.tracker.experiment_id


# ---------------------------------------------------------------------------------------------


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


def test_other_ranks_get_a_null_tracker_that_writes_nothing(tmp_path):
    nt = make_tracker(1, tmp_path, "exp", "r", params={"a": {"b": 1}})
    assert isinstance(nt, NullTracker) and nt.run_id is None
    nt.log_metrics({"x": 1.0}, step=0)
    nt.log_params({"a": 1})
    nt.set_tags({"t": 1})
    nt.log_dict({"a": 1}, "x.json")
    nt.log_artifact(tmp_path / "missing")
    nt.end("FAILED")
    assert list(tmp_path.iterdir()) == []  # no db, no artifacts


def test_rank_zero_gets_a_tracker(store):
    t = make_tracker(0, store, "exp-null", "r")
    assert isinstance(t, Tracker) and t.run_id
    t.end()


def test_plot_curves(tmp_path):
    hist = {"train loss": [(0, 3.0), (10, 2.5), (20, 2.1), (30, float("nan"))],
            "val bpb RETRO on": [(10, 2.0), (20, 1.8)], "val bpb RETRO off": [(10, 2.2), (20, 2.1)]}
    out = plot_curves(hist, tmp_path / "plots" / "curves.png", title="RETRO tiny")
    data = out.read_bytes()
    assert out.stat().st_size > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_steps_redone_after_a_resume_are_not_logged_twice(store, no_env_uri):
    """A retry resumes from the last checkpoint (step 2) after the run had logged up to step 4:
    steps 3 and 4 are redone, and MLflow would append a second point for each."""
    t = Tracker.start(store, "exp", "run-redo")
    for step in (1, 2, 3, 4):
        t.log_metrics({"loss": 10.0 - step}, step=step)
    t2 = Tracker.start(store, "exp", "run-redo")  # the retry
    for step in (3, 4, 5, 6):
        t2.log_metrics({"loss": 20.0 - step}, step=step)
    t2.end()
    hist = _history(MlflowClient(tracking_uri=t2.uri), t2.run_id, "loss")
    assert hist == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 15.0), (6, 14.0)]


# ---------------------------------------------------------------------------------------------
# what the MLflow UI shows (ratray/mlflow_view.py): experiment kind, headline charts, description,
# the corpus as a dataset, system metrics


@pytest.fixture(scope="module")
def chunk_store(tmp_path_factory):
    """A real chunk store of 5 stdlib modules (32-token BPE chunks), built without Ray."""
    from ratray.config import ChunkConfig, CorpusConfig
    from ratray.data.chunks import build_chunk_store

    return build_chunk_store(CorpusConfig(max_docs=5, max_bytes=30_000, val_fraction=0.2),
                             ChunkConfig(chunk_tokens=32, vocab_size=512),
                             tmp_path_factory.mktemp("chunks"), progress=False)


@pytest.fixture(scope="module")
def viewed(store, chunk_store, tmp_path_factory, no_env_uri):
    """A run as the training worker logs it: system metrics sampled every 0.2 s, the chunk store
    as its dataset (logged again by a resume), metrics with their headline copies, a plot at the
    top level and one in eval/; ended, then resumed and ended again."""
    t = Tracker.start(store, "exp-view", "run-view", system_metrics=0.2)
    t.log_dataset(**store_dataset(chunk_store.path))
    for step in (1, 2):
        m = {"loss": 3.0 - step, "lr": 1e-3, "val_bpb_retro_on": 2.0 - 0.1 * step, "val_tokens": 9}
        t.log_metrics({**m, **headline(m)}, step=step)
    png = plot_curves({"loss": [(1, 2.0), (2, 1.0)]}, tmp_path_factory.mktemp("p") / "loss.png")
    t.log_artifact(png)
    t.log_artifact(png, "eval")
    time.sleep(0.5)  # a few system-metric samples
    t.end()
    t2 = Tracker.start(store, "exp-view", "run-view")
    t2.log_dataset(**store_dataset(chunk_store.path))
    t2.end()
    client = MlflowClient(tracking_uri=t.uri)
    return SimpleNamespace(tracker=t, client=client, run=client.get_run(t.run_id),
                           exp=client.get_experiment(t.experiment_id))


def test_experiments_are_typed_as_model_training(viewed):
    assert viewed.exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING == "custom_model_development"


def test_an_untyped_experiment_is_typed_and_a_chosen_kind_kept(store, no_env_uri):
    client = MlflowClient(tracking_uri=tracking_uri(store))
    old = client.create_experiment("exp-untyped")  # as ratray created experiments before
    chosen = client.create_experiment("exp-genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker.start(store, "exp-untyped", "r").end()
    Tracker.start(store, "exp-genai", "r").end()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_headline_copies_losses_bpb_and_realms_heldout_accuracies_only():
    m = {"loss": 1.0, "lr": 0.1, "val_bpb_retro_on": 2.0, "val_bpb": 2.1, "val_loss": 3.0,
         "tokens_per_s": 5.0, "system/cpu": 9.0, "val_acc_retrieval": 0.4, "val_exact_null": 0.1,
         "val_exact_gain_lo": 0.0, "acc_retrieval": 0.3}
    assert headline(m) == {"headline/loss": 1.0, "headline/val_bpb_retro_on": 2.0,
                           "headline/val_bpb": 2.1, "headline/val_loss": 3.0,
                           "headline/val_acc_retrieval": 0.4, "headline/val_exact_null": 0.1}


def test_the_chunk_store_is_the_runs_training_dataset_once(viewed, chunk_store):
    inputs = viewed.run.inputs.dataset_inputs
    assert len(inputs) == 1  # the resume logged the same dataset again: still one input
    (ds_in,) = inputs
    ds = ds_in.dataset
    counts = chunk_store.meta["counts"]
    assert ds.name == "stdlib/bpe-32" and ds.digest == chunk_store.key[:16]
    assert {t.key: t.value for t in ds_in.tags}["mlflow.data.context"] == "training"
    profile = json.loads(ds.profile)
    assert profile["num_rows"] == len(chunk_store) == counts["chunks"]["total"]
    assert profile["documents"] == counts["documents"] and profile["tokens"] == counts["tokens"]
    assert json.loads(ds.source)["uri"] == str(chunk_store.path.resolve())


def test_a_live_update_of_the_store_changes_the_datasets_digest(chunk_store, tmp_path):
    from ratray.data.append import update_store
    from ratray.data.store import ChunkStore

    copy = shutil.copytree(chunk_store.path, tmp_path / "store")
    before = store_dataset(copy)
    store = ChunkStore.open(copy)
    doc, (start, stop) = next(iter(store.documents().items()))
    update_store(store, remove=[doc])
    after = store_dataset(copy)
    assert after["name"] == before["name"] and after["digest"] != before["digest"]
    assert before["profile"]["removed_chunks"] == 0 and after["profile"]["removed_chunks"] == stop - start


def test_a_dataset_without_a_valid_digest_is_refused(viewed):
    with pytest.raises(ValueError, match="digest of 1-36 characters"):
        viewed.tracker.log_dataset("x", "d" * 37, "/x", {"num_rows": 1})


def test_system_metrics_are_sampled_while_the_run_lasts(viewed):
    keys = set(viewed.run.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    cpu = viewed.client.get_metric_history(viewed.run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 for m in cpu)


def test_the_description_shows_the_headline_and_every_plot(viewed):
    note = viewed.run.data.tags[NOTE_TAG]
    rid = viewed.run.info.run_id
    assert "loss **1.0000**" in note and "val_bpb_retro_on **1.8000**" in note
    assert f"![loss.png](get-artifact?path=loss.png&run_uuid={rid})" in note
    assert f"![eval/loss.png](get-artifact?path=eval%2Floss.png&run_uuid={rid})" in note


def test_run_links_open_the_model_training_view(viewed):
    t = viewed.tracker
    assert t.run_url(5005) == (f"http://127.0.0.1:5005/#/experiments/{t.experiment_id}/runs/"
                               f"{t.run_id}/model-metrics?workflowType=machine_learning")

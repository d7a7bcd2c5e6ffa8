"""REALM end to end on the session's Ray: wordpiece blocks, index v1 from the pretrained doc tower,
Ray Train + DeepSpeed workers, asynchronous refreshes, MLflow, resume with the index version."""
from __future__ import annotations

import json
import shutil

import pytest

from ratray.config import ConfigError, load_config
from ratray.realm.config import RealmJobConfig

SMALL_REALM = ["chunks.tokenizer=wordpiece", "chunks.chunk_tokens=32", "corpus.max_bytes=40000",
               "corpus.val_fraction=0.2", "index.factory=Flat", "index.metric=ip", "index.shards=2",
               "model.retriever_layers=1", "model.reader_layers=1", "model.query_tokens=16", "model.k=3",
               "train.steps=4", "train.micro_batch=4", "train.num_workers=2", "train.warmup_steps=1",
               "train.lr=1e-4", "train.log_every=2", "train.checkpoint_every=2", "refresh.every=2",
               "eval_queries=16", "train.run_name=realm-test",
               "freeze_towers_steps=1"]  # step 0 trains the reader alone (ZeRO with tower grads None)


def test_realm_job_config_is_valid_with_its_own_defaults():
    job = RealmJobConfig()
    assert (job.chunks.tokenizer, job.chunks.chunk_tokens, job.index.metric) == ("wordpiece", 288, "ip")
    assert job.train.run_name == "realm-demo"
    loaded = load_config(RealmJobConfig, None, ["chunks.chunk_tokens=64"])  # a YAML/--set section
    assert (loaded.chunks.tokenizer, loaded.chunks.chunk_tokens, loaded.index.metric) == ("wordpiece", 64, "ip")


@pytest.mark.parametrize("override,key", [
    ("chunks.tokenizer=bpe", "chunks.tokenizer"), ("index.metric=l2", "index.metric"),
    ("model.chunk_tokens=64", "model.chunk_tokens"), ("model.block_tokens=64", "model.block_tokens"),
    ("model.k=1", "model.k"), ("model.query_tokens=480", "chunks.chunk_tokens"),
    ("refresh.every=-1", "refresh.every")])
def test_realm_config_names_what_is_wrong(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RealmJobConfig, None, SMALL_REALM + [override])


def test_realm_trains_refreshes_and_resumes_with_its_index_version(ray_session, tmp_path, capsys):
    from mlflow import MlflowClient

    from jobs.show_run import main as show_run
    from ratray.index.store import load_manifest, serving_dir, version_dir, write_current
    from ratray.realm.driver import run
    from ratray.tracking import tracking_uri

    job = load_config(RealmJobConfig, None, SMALL_REALM + [f"workdir={tmp_path}"])
    s = run(job, progress=False)
    f = s["final"]
    assert s["steps"] == 4 and s["refresh"]["failed"] == 0
    assert s["refresh"]["initial"]["version"] == 1 and s["refresh"]["requested"] >= 1
    for key in ("loss", "acc_retrieval", "acc_null", "retrieval_utility", "index_version",
                "staleness_steps", "val_acc_retrieval", "val_acc_null", "val_retrieval_utility"):
        assert key in f, key
    assert 0 <= f["val_acc_null"] <= 1 and f["val_queries"] > 0 and f["val_masked_tokens"] > 0
    for key in ("val_acc_retrieval", "val_acc_null"):  # accuracies count whole masked tokens
        right = f[key] * f["val_masked_tokens"]
        assert abs(right - round(right)) < 1e-6, (key, right)
    run_dir = tmp_path / "runs" / "realm-test"
    assert (run_dir / "summary.json").is_file() and (run_dir / "masked_accuracy.png").is_file()
    assert show_run(["--workdir", str(tmp_path), "--run-name", "realm-test"]) == 0
    shown = capsys.readouterr().out
    assert "REALM run realm-test: 4 steps" in shown and "null document only" in shown

    # a client of its own: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for the
    # rest of the session (and send later tests' drivers to this run's database)
    client = MlflowClient(tracking_uri(tmp_path))
    losses = [m.value for m in sorted(client.get_metric_history(s["mlflow"]["run_id"], "loss"),
                                      key=lambda m: m.step)]
    assert len(losses) == 2 and losses[-1] < losses[0]  # the marginal likelihood is being learned
    assert client.get_metric_history(s["mlflow"]["run_id"], "index_serving_version")

    # a refresh that finished after the last checkpoint: the disk now serves a newer version ...
    ckpt_version = int(f["index_serving_version"])
    root = run_dir / "index"
    newest = max(int(p.name[1:]) for p in (root / "versions").iterdir())
    shutil.copytree(serving_dir(root), version_dir(root, newest + 1))
    m = load_manifest(version_dir(root, newest + 1))
    m.version = newest + 1
    (version_dir(root, newest + 1) / "manifest.json").write_text(m.to_json())
    write_current(root, version_dir(root, newest + 1))
    # ... but the resumed run serves the index its checkpoint was trained against, republished
    # under a higher number (the serving version never goes backwards)
    job2 = load_config(RealmJobConfig, None, SMALL_REALM + [f"workdir={tmp_path}", "train.steps=6",
                                                            "train.warmup_steps=1"])
    s2 = run(job2, progress=False)
    assert s2["steps"] == 6 and s2["mlflow"]["run_id"] == s["mlflow"]["run_id"]
    restored = int(s2["final"]["index_version_restored"])
    assert restored > newest + 1
    assert load_manifest(version_dir(root, restored)).extra["republished_from"] == ckpt_version
    assert s2["refresh"]["serving_version"] >= restored
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


def test_realm_chunk_store_is_not_built_beside_a_build_holding_the_workdir(tmp_path):
    """The REALM driver writes chunk stores under the workdir's build lock: beside a running
    build it fails at once, naming the workdir, instead of racing it."""
    from ratray.realm.driver import resolve
    from ratray.workdir import Workdir, WorkdirBusyError

    job = load_config(RealmJobConfig, None, SMALL_REALM + [f"workdir={tmp_path}"])
    with Workdir(tmp_path).locked("build"):
        with pytest.raises(WorkdirBusyError, match=str(tmp_path)):
            resolve(job, progress=False)
    assert not (tmp_path / "chunks").exists() or not any((tmp_path / "chunks").iterdir())

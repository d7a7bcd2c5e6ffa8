"""RETRO on Ray Train + DeepSpeed: a 2-worker run whose loss falls, that checkpoints, resumes at the
right step, and whose MLflow run reads back."""
import json
import statistics

import pytest
import torch
from mlflow import MlflowClient

from ratray.config import ConfigError, load_config
from ratray.retro.config import RetroJobConfig
from ratray.retro.driver import resolve, run
from ratray.tracking import tracking_uri

TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128",
        "model.enc_layers=1", "model.enc_d_model=32", "model.enc_n_head=2", "model.cca_layers=[1,2]",
        "train.micro_batch=2", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2",
        "train.eval_sequences=8", "train.num_workers=2", "train.zero_stage=2"]


def job(wd, *extra):
    return load_config(RetroJobConfig, None, TINY + [f"workdir={wd}", *extra])


@pytest.fixture(scope="module")
def trained(small_workdir):
    """One run trained for 6 steps, then resumed by name to 9 (2 workers, ZeRO-2, checkpoints
    every 3 steps); its first summary, the metrics at its step-6 checkpoint, its final summary."""
    wd, _, _ = small_workdir
    first = run(job(wd, "train.steps=6", "train.checkpoint_every=3", "train.run_name=t-resume"),
                progress=False)
    hist = json.loads((wd / "runs" / "t-resume" / "final_metrics.json").read_text())
    # the same run name resumes from step 6 and continues to 9 (data position and schedule intact)
    second = run(job(wd, "train.steps=9", "train.checkpoint_every=3", "train.run_name=t-resume"),
                 progress=False)
    return wd, first, hist, second


@pytest.mark.slow
def test_two_workers_train_checkpoint_resume_and_log_to_mlflow(trained):
    wd, first, hist, second = trained
    assert first["steps"] == 6 and first["checkpoint"]
    assert first["val_bpb_retro_on"] > 0 and first["val_bpb_retro_off"] > 0
    assert second["steps"] == 9

    c = MlflowClient(tracking_uri(wd))
    exp = c.get_experiment_by_name("ratray-retro")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`ratray.run_name` = 't-resume'")
    assert len(runs) == 1  # resumed into the same MLflow run
    r = runs[0]
    assert r.data.params["train.zero_stage"] == "2" and r.data.params["model.n_layer"] == "2"
    assert r.data.tags["ratray.resumed_from_step"] == "6"
    loss = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)]
    steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "loss"))
    assert steps == [2, 3, 4, 6, 8, 9]  # no step logged twice after the resume
    assert loss[-1] < loss[0] - 0.25  # the loss falls
    for key in ("val_bpb_retro_on", "val_bpb_retro_off", "lr", "tokens_per_s"):
        assert c.get_metric_history(r.info.run_id, key), key
    assert hist["step"] == 6
    artifacts = {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"summary.json", "loss.png", "config.json", "final_metrics.json"} <= artifacts


@pytest.mark.slow
def test_evaluation_scores_the_checkpoint_on_the_bytes_training_scored(trained, capsys):
    """jobs/evaluate.py on the trained run: RETRO[ON] and [OFF] equal what the run's own final
    evaluation printed (same checkpoint, same bytes), with intervals, bpb(α), the size curve and
    the report attached to the run's MLflow record."""
    from jobs.evaluate import main as evaluate_main

    wd, _, _, second = trained
    assert evaluate_main(["--workdir", str(wd), "--run-name", "t-resume", "--resamples", "300",
                          "--fractions", "0.5,1.0", "--sequences", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "RETRO[ON] − t-resume RETRO[OFF]" in out and "95% CI" in out
    report = json.loads((wd / "runs" / "t-resume" / "eval" / "report.json").read_text())
    on, off = report["rows"]
    assert (on["retrieval"], off["retrieval"]) == ("on", "off")
    assert report["eval"]["sequences"] == 8  # the 8 the run's own evaluation scored (TINY)
    assert on["bpb"] == pytest.approx(second["val_bpb_retro_on"], rel=1e-4)
    assert off["bpb"] == pytest.approx(second["val_bpb_retro_off"], rel=1e-4)
    for r in (on, off):
        assert r["ci95"][0] <= r["bpb"] <= r["ci95"][1] and r["non_embedding_params"] > 0
        assert [p["alpha"] for p in r["by_overlap"]] == [0.125, 0.25, 0.5, 0.75, 1.0]
        assert r["by_overlap"][-1]["chunks"] == report["eval"]["chunks"]
    (diff,) = report["differences"]
    assert (diff["a"], diff["b"]) == (on["model"], off["model"])
    assert diff["ci95"][0] <= diff["delta_bpb"] <= diff["ci95"][1]
    sizes = report["database_size"]
    assert [p["fraction"] for p in sizes] == [0.5, 1.0] and sizes[0]["chunks"] < sizes[1]["chunks"]
    files = {p.name for p in (wd / "runs" / "t-resume" / "eval").iterdir()}
    assert {"report.json", "report.md", "bpb_vs_params.png", "bpb_by_overlap.png", "bpb_vs_database.png",
            "per_chunk.parquet", "per_document.parquet"} <= files
    c = MlflowClient(tracking_uri(wd))
    assert {a.path for a in c.list_artifacts(second["mlflow"]["run_id"], "eval")} >= {"eval/report.json"}


@pytest.fixture(scope="module")
def retrofitted(small_workdir):
    """A baseline trained for 4 steps, then RETROfitted for 3 (its decoder frozen)."""
    wd, _, _ = small_workdir
    base = run(job(wd, "model_type=baseline", "train.steps=4", "train.run_name=t-base"), progress=False)
    fit = run(job(wd, "train.steps=3", "train.run_name=t-fit", "init_from=t-base"), progress=False)
    return wd, base, fit


@pytest.mark.slow
def test_retrofit_trains_only_the_retrieval_path_of_a_frozen_baseline(retrofitted):
    from jobs.evaluate import main as evaluate_main
    from ratray.train.trainer import load_weights

    wd, base, fit = retrofitted
    assert fit["retrofit"]["run"] == "t-base" and fit["retrofit"]["tokens_share"] == pytest.approx(3 / 4)
    before, after = load_weights(base["checkpoint"]), load_weights(fit["checkpoint"])
    assert set(before) < set(after)  # the encoder and the CCA layers were added
    assert all(torch.equal(before[n], after[n]) for n in before)  # the decoder did not move
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in after if ".cca.attn.proj" in n)
    # RETRO[OFF] of the RETROfitted model is the baseline itself: same bytes, same bits
    assert evaluate_main(["--workdir", str(wd), "--run-name", "t-fit", "--compare", "t-base",
                          "--resamples", "200", "--fractions", "", "--quiet"]) == 0
    report = json.loads((wd / "runs" / "t-fit" / "eval" / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["t-fit RETRO[OFF]"]["bpb"] == pytest.approx(rows["t-base"]["bpb"], rel=1e-6)
    from ratray.eval.report import format_summary

    assert "RETROfitted from baseline run t-base (decoder frozen)" in format_summary(fit)


def test_retrofit_refuses_what_cannot_be_retrofitted(retrofitted):
    wd, _, _ = retrofitted
    with pytest.raises(ConfigError, match="zero_init_cca"):
        job(wd, "init_from=x", "model.zero_init_cca=false")
    with pytest.raises(ConfigError, match="model_type=retro"):
        job(wd, "init_from=x", "model_type=baseline")
    with pytest.raises(ConfigError, match="no finished run 'nobody'"):
        resolve(job(wd, "init_from=nobody"))
    with pytest.raises(ConfigError, match="another decoder: model.d_model 64 != 32"):
        resolve(job(wd, "init_from=t-base", "model.d_model=32"))
    with pytest.raises(ConfigError, match="RETROfit starts from a baseline"):
        resolve(job(wd, "init_from=t-fit", "train.run_name=t-fit2"))


def test_bad_configuration_fails_before_any_work(small_workdir, tmp_path):
    wd, _, _ = small_workdir
    with pytest.raises(ConfigError, match="chunks.chunk_tokens"):
        resolve(job(wd, "model.chunk_tokens=64"))
    with pytest.raises(ConfigError, match="model.chunk_size"):  # unknown key: named, not ignored
        resolve(job(wd, "model.chunk_size=64"))
    with pytest.raises(ConfigError, match="model.k"):
        resolve(job(wd, "model.k=100000"))
    with pytest.raises(ConfigError, match="cca_layers"):
        resolve(job(wd, "model.cca_layers=[3]"))
    with pytest.raises(ConfigError, match="seq_len"):
        resolve(job(wd, "model.seq_len=100"))
    with pytest.raises(ConfigError, match="no index"):
        resolve(job(tmp_path))


def test_experiment_plans_identical_schedules_and_a_4x_baseline(small_workdir):
    """jobs/retro_experiment.py's runs: the same data and train section for every model; only the
    model differs (baseline-4N twice as wide: ~4x the decoder's non-embedding parameters)."""
    from ratray.retro.experiment import plans
    from ratray.retro.model import Retro

    wd, _, _ = small_workdir
    base = job(wd, "train.steps=40", "train.warmup_steps=12")
    todo = dict(plans(base, "x", retrofit=True, retrofit_share=0.25))
    assert list(todo) == ["baseline-N", "baseline-4N", "RETRO-N", "RETROfit"]
    assert [j.model_type for j in todo.values()] == ["baseline", "baseline", "retro", "retro"]
    assert [j.train.run_name for j in todo.values()] == [f"x-{role}" for role in todo]
    for role in ("baseline-N", "baseline-4N", "RETRO-N"):  # one schedule, one data set
        t = todo[role].train
        assert (t.steps, t.lr, t.micro_batch, t.seed) == (40, base.train.lr, base.train.micro_batch, 0)
        j = todo[role]
        assert (j.corpus, j.chunks, j.index, j.embed) == (base.corpus, base.chunks, base.index, base.embed)
    fit = todo["RETROfit"]
    assert (fit.init_from, fit.train.steps, fit.train.warmup_steps, fit.model.zero_init_cca) == \
        ("x-baseline-N", 10, 10, True)
    store = resolve(base).store

    def decoder_params(j):
        m = Retro(j.model.for_store(store.tokenizer.vocab_size, store.tokenizer.pad_id, store.chunk_tokens))
        return sum(p.numel() for p in m.parameters()) - m.wte.weight.numel()
    ratio = decoder_params(todo["baseline-4N"]) / decoder_params(todo["baseline-N"])
    assert 3.9 < ratio < 4.1, ratio


@pytest.mark.slow
def test_median_step_time_leaves_out_the_start_up_interval(trained):
    from ratray.retro.experiment import median_step_s

    wd, _, _, second = trained
    c = MlflowClient(tracking_uri(wd))
    hist = sorted(c.get_metric_history(second["mlflow"]["run_id"], "step_time_s"), key=lambda m: m.step)
    assert len(hist) > 2  # logged every 2 steps of 9
    assert median_step_s(second) == pytest.approx(statistics.median(m.value for m in hist[1:]))


@pytest.mark.slow
def test_evaluation_searches_a_chosen_index_version_and_scores_named_documents(trained, tmp_path,
                                                                                  capsys):
    """--index-version: neighbours searched now through fresh shard actors on that version equal
    the run's own table (the same exact index), so RETRO[ON] is the same figure; --eval-corpus:
    documents the user names, read by the corpus readers and cut by the run's tokenizer, scored
    ON and OFF with their own report; bad values are refused by name."""
    import inspect

    from jobs.evaluate import main as evaluate_main
    from ratray.index.store import load_manifest, serving_dir

    wd, _, _, second = trained
    v = int(load_manifest(serving_dir(wd / "index")).version)
    args = ["--workdir", str(wd), "--run-name", "t-resume", "--resamples", "200", "--sequences", "8",
            "--fractions", "", "--quiet"]
    assert evaluate_main(args + ["--index-version", str(v)]) == 0
    report = json.loads((wd / "runs" / "t-resume" / "eval" / f"index-v{v}" / "report.json").read_text())
    assert report["source"]["index"]["version"] == v
    assert report["rows"][0]["bpb"] == pytest.approx(second["val_bpb_retro_on"], rel=1e-4)

    docs = tmp_path / "docs"
    docs.mkdir()
    import ratray.index.service as service_module
    import ratray.retro.model as model_module
    (docs / "service.py").write_text(inspect.getsource(service_module))  # also in the database
    (docs / "model.txt").write_text(inspect.getsource(model_module))
    (docs / "tiny.txt").write_text("too short to make one chunk")
    every = [a for a in args if a not in ("--sequences", "8")]  # all of the named documents
    assert evaluate_main(every + ["--eval-corpus", str(docs)]) == 0
    (out,) = (wd / "runs" / "t-resume" / "eval").glob(f"index-v{v}-corpus-*")
    report = json.loads((out / "report.json").read_text())
    src = report["source"]
    assert src["documents"] == 2 and src["skipped"]["counts"] == {"shorter_than_chunk": 1}
    assert report["eval"]["documents"] == 2 and report["eval"]["chunks"] > 8
    on, off = report["rows"][:2]
    assert (on["retrieval"], off["retrieval"]) == ("on", "off") and on["bpb"] != off["bpb"]

    for bad, says in ((["--index-version", "99"], "--index-version 99"),
                      (["--index-version", "0"], "versions start at 1"),
                      (["--eval-corpus", str(tmp_path / "nowhere")], "no such file"),
                      (["--eval-corpus", str(docs / "tiny.txt")], "no document has a whole chunk")):
        assert evaluate_main(args + bad) == 2
        assert says in capsys.readouterr().err


@pytest.mark.slow
def test_documents_added_after_training_are_read_at_once_and_forgotten_when_removed(trained, tmp_path):
    """The living database (ratray/retro/live.py) on a copy of the trained run's workdir: two
    stdlib modules the run never saw are added through update_index while a service answers
    searches without pause, then removed. Scoring edited versions of them: after the add their
    chunks' neighbours overlap them (r(C) >= 0.5 rises) and a generation's neighbours come from
    them; after the removal every figure is back to the one before (same neighbours); not one
    search failed during either swap, and the service moved through three versions."""
    import shutil
    import sysconfig

    from ratray.data.versions import edited
    from ratray.retro import live

    wd, _, _, _ = trained
    copy = tmp_path / "wd"
    shutil.copytree(wd, copy, ignore=shutil.ignore_patterns("ray_results", "mlruns*"))
    data = tmp_path / "data"
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("textwrap.py", "shlex.py"):  # beyond the small corpus's first ~90 KB
        text = open(f"{stdlib}/{name}", encoding="utf-8").read()[:5000]
        (data / "held").mkdir(parents=True, exist_ok=True)
        (data / "related").mkdir(parents=True, exist_ok=True)
        (data / "held" / name).write_text(text)
        (data / "related" / live.related_name(name)).write_text(edited(text, name, 1, 0))

    x = live.run(str(copy), "t-resume", data, n_boot=200, max_tokens=32, progress=False)
    st = x["stages"]
    versions = [st[k]["index_version"] for k in ("before", "after", "removed")]
    assert versions[0] < versions[1] < versions[2]
    q = x["queries_during_updates"]
    assert q["failed"] == 0 and q["searches"] > 0, q["errors"]
    assert len(q["versions_seen"]) >= 2
    share = {k: st[k]["eval"]["share_r_ge_0.5"] for k in st}
    assert share["after"] > share["before"] + 0.3 and share["removed"] == share["before"]
    assert st["removed"]["rows"][0]["bpb"] == pytest.approx(st["before"]["rows"][0]["bpb"], rel=1e-6)
    assert x["removed_minus_before"]["delta_bpb"] == pytest.approx(0, abs=1e-6)
    assert x["generation"]["after"]["neighbours_from_added_documents"] > 0.5
    assert x["generation"]["after"]["documents"] == 2
    assert live.copied_share(list(range(20)), list(range(5, 30))) == pytest.approx(8 / 13)
    assert x["generation"]["before"]["neighbours_from_added_documents"] == 0
    assert x["updates"]["add"]["chunks_added"] > 0 and x["updates"]["remove"]["chunks_removed"] > 0
    assert (copy / "experiments" / "live" / "live.md").read_text().count("| ") >= 3

"""A RETRO run and a REALM run logged through the MLflow tracking server on PostgreSQL, exactly as
jobs log on the cluster, and read back with MlflowClient; optionally opened in headless Chromium.

    .venv/bin/python cluster/mlflowdemo.py [--workdir /tmp/ratray-mlflowdemo] [--ui-check OUT]
        [--only retro|realm] [--keep]
    (tooling, like cluster/mlflowserver.py: needs the machine's PostgreSQL, the `server` extra and,
    for --ui-check, Debian's chromium; ~10-20 min on 2 busy cores)

Data flow:

    MlflowServer.up (own database ratray_mlflowdemo_<pid>, artifacts served from <workdir>/served)
      └─ MLFLOW_TRACKING_URI=http://127.0.0.1:<port>   (as on the cluster)
    local Ray (2 CPUs) ─► RETRO: chunk store + index, a 1-worker tiny run, jobs/evaluate.py (report)
                       ─► REALM: wordpiece blocks, index v1, a 1-worker tiny run with refreshes
    MlflowClient(server) ─► per run: params, metric histories, the dataset, artifacts (the report,
                            the plots) downloaded through the server and compared with run_dir's
    --ui-check OUT ─► cluster/uicheck.py on the server itself (artifacts through --serve-artifacts)
    MlflowServer.down (drop the database, unless --keep)

Prints one block per run and a JSON summary at <workdir>/mlflowdemo.json.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mlflowserver import DEFAULT_PG, ClusterError, MlflowServer  # noqa: E402
from uicheck import free_port  # noqa: E402

BUILD = ["corpus.max_docs=40", "corpus.max_bytes=90000", "corpus.val_fraction=0.2", "chunks.chunk_tokens=32",
         "chunks.vocab_size=2048", "index.factory=Flat", "index.shards=2", "index.recall_queries=50"]
RETRO = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128", "model.enc_layers=1",
         "model.enc_d_model=32", "model.enc_n_head=2", "model.cca_layers=[1,2]", "train.micro_batch=2",
         "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2", "train.eval_sequences=8",
         "train.num_workers=1", "train.steps=6", "train.run_name=retro-pg"]
REALM = ["chunks.tokenizer=wordpiece", "chunks.chunk_tokens=32", "corpus.max_bytes=40000",
         "corpus.val_fraction=0.2", "index.factory=Flat", "index.metric=ip", "index.shards=2",
         "model.retriever_layers=1", "model.reader_layers=1", "model.query_tokens=16", "model.k=3",
         "train.steps=4", "train.micro_batch=4", "train.num_workers=1", "train.warmup_steps=1",
         "train.lr=1e-4", "train.log_every=2", "train.checkpoint_every=2", "refresh.every=2",
         "eval_queries=16", "train.run_name=realm-pg", "freeze_towers_steps=1"]


def run_retro(workdir: str) -> dict:
    """Build, train and evaluate a tiny RETRO run; its summary."""
    from jobs.evaluate import main as evaluate
    from ratray.build import build
    from ratray.config import BuildConfig, load_config
    from ratray.retro.config import RetroJobConfig
    from ratray.retro.driver import run

    build(load_config(BuildConfig, None, BUILD + [f"workdir={workdir}"]), progress=False)
    summary = run(load_config(RetroJobConfig, None, RETRO + [f"workdir={workdir}"]), progress=False)
    if evaluate(["--workdir", workdir, "--run-name", "retro-pg", "--resamples", "300",
                 "--fractions", "0.5,1.0", "--sequences", "8", "--quiet"]) != 0:
        raise RuntimeError("jobs/evaluate.py failed on retro-pg")
    return summary


def run_realm(workdir: str) -> dict:
    from ratray.config import load_config
    from ratray.realm.config import RealmJobConfig
    from ratray.realm.driver import run

    return run(load_config(RealmJobConfig, None, REALM + [f"workdir={workdir}"]), progress=False)


def read_back(url: str, summary: dict, scratch: Path) -> dict:
    """What MlflowClient reads back from the server for the run of `summary`, and whether every
    artifact downloaded through the server equals the run folder's file."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    run_id = summary["mlflow"]["run_id"]
    run = client.get_run(run_id)
    top = client.list_artifacts(run_id)
    files = sorted([a.path for a in top if not a.is_dir]
                   + [a.path for d in top if d.is_dir for a in client.list_artifacts(run_id, d.path)])
    run_dir = Path(summary["run_dir"])
    same = {}
    for p in files:
        local = run_dir / p
        if local.is_file():
            got = client.download_artifacts(run_id, p, str(scratch / run_id))
            same[p] = filecmp.cmp(got, local, shallow=False)
    metrics = run.data.metrics
    return {"run_id": run_id, "run_name": run.info.run_name, "status": run.info.status,
            "artifact_uri": run.info.artifact_uri, "params": len(run.data.params),
            "params_sample": {k: run.data.params[k] for k in sorted(run.data.params)[:4]},
            "metrics": {k: round(v, 4) for k, v in sorted(metrics.items()) if not k.startswith("system/")},
            "loss_history": [(m.step, round(m.value, 4)) for m in
                             sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)],
            "system_metrics": sorted(k for k in metrics if k.startswith("system/")),
            "datasets": [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs],
            "artifacts": files, "downloaded_equal": same,
            "experiment_kind": client.get_experiment(run.info.experiment_id).tags.get("mlflow.experimentKind")}


def _print(name: str, r: dict) -> None:
    print(f"== {name}: run {r['run_name']} ({r['run_id']}) {r['status']}, artifacts at {r['artifact_uri']}")
    print(f"   experiment kind: {r['experiment_kind']}; dataset: {r['datasets']}")
    print(f"   {r['params']} params, e.g. {r['params_sample']}")
    print(f"   {len(r['metrics'])} metrics, headline: "
          f"{ {k: v for k, v in r['metrics'].items() if k.startswith('headline/')} }")
    print(f"   loss history: {r['loss_history']}")
    print(f"   system metrics: {len(r['system_metrics'])} ({', '.join(r['system_metrics'][:3])}, ...)")
    print(f"   artifacts: {r['artifacts']}")
    print(f"   downloaded through the server == run folder's file: "
          f"{sum(r['downloaded_equal'].values())}/{len(r['downloaded_equal'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cluster/mlflowdemo.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ratray-mlflowdemo"))
    ap.add_argument("--pg", default=os.environ.get("RATRAY_POSTGRES", DEFAULT_PG))
    ap.add_argument("--only", choices=["retro", "realm"], default=None)
    ap.add_argument("--ui-check", default=None, metavar="OUT", help="open each run in headless Chromium")
    ap.add_argument("--keep", action="store_true", help="leave the server up and its database")
    args = ap.parse_args(argv)
    wd = Path(args.workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    srv = MlflowServer(port=free_port(), database=f"ratray_mlflowdemo_{os.getpid()}", pg=args.pg,
                       artifacts=wd / "served", state_dir=tempfile.mkdtemp(prefix="ratray-mlfdemo-"))
    try:
        srv.up()
    except ClusterError as e:
        print(f"ratray: {e}", file=sys.stderr)
        return 2
    os.environ["MLFLOW_TRACKING_URI"] = srv.url
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per downloaded file
    out, t0 = {"server": srv.url, "database": srv.database, "runs": {}}, time.time()
    try:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, namespace="ratray-mlflowdemo", log_to_driver=False,
                 object_store_memory=512 * 1024 * 1024)
        todo = [("retro", "ratray-retro", run_retro), ("realm", "ratray-realm", run_realm)]
        for name, experiment, fn in todo:
            if args.only and name != args.only:
                continue
            ts = time.time()
            summary = fn(str(wd / name))
            r = read_back(srv.url, summary, wd / "downloads")
            r["seconds"] = round(time.time() - ts, 1)
            if args.ui_check:
                from uicheck import check_run

                ui = check_run(srv.url, experiment, r["run_name"], Path(args.ui_check) / name, url=srv.url)
                r["ui_check"] = {p["page"]: {"ok": p["ok"], "missing": p["missing"],
                                             "screenshot": p["screenshot"]} for p in ui["pages"]}
            out["runs"][name] = r
            _print(name, r)
            if "ui_check" in r:
                print("   ui check: " + ", ".join(f"{k} {'ok' if v['ok'] else 'FAIL ' + str(v['missing'])}"
                                               f" ({v['screenshot']})" for k, v in r["ui_check"].items()))
    finally:
        out["seconds"] = round(time.time() - t0, 1)
        (wd / "mlflowdemo.json").write_text(json.dumps(out, indent=1, default=str))
        if not args.keep:
            srv.down(drop_database=True)
            shutil.rmtree(srv.state_dir, ignore_errors=True)
    ok = all(all(r["downloaded_equal"].values()) and r["status"] == "FINISHED"
             and all(v["ok"] for v in r.get("ui_check", {}).values()) for r in out["runs"].values())
    print(f"summary: {wd / 'mlflowdemo.json'} ({out['seconds']} s){'' if ok else ' -- SOMETHING FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

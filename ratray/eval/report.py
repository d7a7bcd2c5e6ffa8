"""Reports of finished runs: read a run's `summary.json` back and print what a person wants to see
(`make demo`, `jobs/show_run.py`, the end of every training job), for RETRO, baseline and REALM."""
from __future__ import annotations

import json

from ratray.workdir import Workdir


def load_summary(workdir: str, run_name: str) -> dict:
    path = Workdir(workdir).run_summary(run_name)
    if not path.is_file():
        raise FileNotFoundError(f"no summary for run '{run_name}' at {path} (has it finished?)")
    return json.loads(path.read_text())


def format_summary(s: dict) -> str:
    """The human-readable result block of a run, whichever method trained it."""
    return format_realm(s) if s.get("model_type") == "realm" else format_retro(s)


def format_retro(s: dict) -> str:
    """RETRO (bits-per-byte with retrieval on and off) or the baseline."""
    from ratray.tracking import ui_command

    on, off = s.get("val_bpb_retro_on"), s.get("val_bpb_retro_off")
    lines = [f"run {s['run_name']} ({s['model_type']}, retrieval: {s['retrieval']}): "
             f"{s['steps']} steps, {s['tokens']:,} tokens, {s['wall_time_s']:.0f} s"]
    if on is not None:
        lines.append(f"validation bits-per-byte  RETRO[ON] {on:.4f}   RETRO[OFF] {off:.4f}   "
                     f"(retrieval {'helps' if on < off else 'does not help yet'}: {off - on:+.4f})")
    else:
        lines.append(f"validation bits-per-byte  {off:.4f}")
    ml = s["mlflow"]
    lines += [f"checkpoint: {s['checkpoint']}",
              f"MLflow: {ml['tracking_uri']}  experiment '{ml['experiment']}'  run {ml['run_id']}",
              f"open the MLflow UI: {ui_command(ml['tracking_uri'])}",
              f"summary: {s['run_dir']}/summary.json"]
    return "\n".join(lines)


def format_realm(s: dict) -> str:
    """REALM: masked-token accuracy with retrieval and with the null document, the index."""
    f = s["final"]
    r = s["refresh"]
    lines = [f"REALM run {s['run_name']}: {s['steps']} steps in {s['wall_time_s']} s",
             f"  masked-token accuracy (val): with retrieval {_fmt(s['val_acc_retrieval'])}, "
             f"null document only {_fmt(s['val_acc_null'])}",
             f"  retrieval utility (val): {_fmt(s['val_retrieval_utility'])} nats per query",
             f"  index: serving version {r['serving_version']} (weights of step {r['serving_step']}), "
             f"{r['completed']} builds, {r['failed']} failed, {r['coalesced']} coalesced requests",
             f"  final train loss {_fmt(f.get('loss'))}",
             f"  summary: {s['run_dir']}/summary.json; MLflow: {s['mlflow']['tracking_uri']} "
             f"(run {s['mlflow']['run_id']})"]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"

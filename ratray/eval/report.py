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
        lines.append(f"validation bits-per-byte  RETRO[ON] {on:.4f}   RETRO[OFF] {off:.4f}   (training's "
                     f"check, no interval: jobs/evaluate.py --run-name {s['run_name']} compares them)")
    else:
        lines.append(f"validation bits-per-byte  {off:.4f}")
    fit = s.get("retrofit")
    if fit:
        share = f" = {fit['tokens_share']:.1%} of the baseline's" if fit.get("tokens_share") else ""
        lines.append(f"RETROfitted from baseline run {fit['run']} (decoder frozen): "
                     f"{fit['tokens']:,} training tokens{share}")
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


def format_evaluation(r: dict, markdown: bool = True) -> str:
    """An evaluation report (ratray/retro/evaluate.py) as Markdown tables a person reads; every
    figure with its 95% interval, every difference with its verdict."""
    e, b, src = r["eval"], r["bootstrap"], r.get("source") or {}
    ci = lambda c: f"[{c[0]:.4f}, {c[1]:.4f}]"  # noqa: E731
    what = f"documents of {src['eval_corpus']}" if src.get("eval_corpus") else "validation"
    ix = src.get("index") or {}
    where = (f"Neighbours searched now: index version {ix['version']}"
             + (f" (running service {ix['service']})" if ix.get("service") else "") + ". "
             if ix else "")
    lines = [f"# Evaluation of run {r['run']}", "", where +
             f"{e['sequences']} {what} sequences: {e['chunks']} chunks of {e['documents']} "
             f"documents (a version counted with its original), {e['bytes']:,} bytes. "
             f"95% intervals: bootstrap over {b['unit']} "
             f"({b['resamples']} resamples), paired for differences.", "",
             "| model | retrieval | non-embedding params | bits per byte | 95% CI |", "|---|---|---|---|---|"]
    lines += [f"| {x['model']} | {x['retrieval']} | {x['non_embedding_params']:,} | {x['bpb']:.4f} | "
              f"{ci(x['ci95'])} |" for x in r["rows"]]
    if r["differences"]:
        lines += ["", "## Differences", ""] + [f"- {d['verdict']}" for d in r["differences"]]
    dc = r.get("decontaminated") or {}
    if dc.get("rows"):
        lines += ["", f"## Decontaminated: {dc['documents_left_out']} validation document(s) that "
                  "near-duplicate the database left out", "",
                  "| model | bits per byte | 95% CI |", "|---|---|---|"]
        lines += [f"| {x['model']} | {x['bpb']:.4f} | {ci(x['ci95'])} |" for x in dc["rows"]]
    elif dc and not dc["documents_left_out"]:
        lines += ["", "No validation document near-duplicates the database (corpus cleaning's "
                  "report): the decontaminated subset is the whole set."]
    alphas = [p["alpha"] for p in r["rows"][0]["by_overlap"]]
    lines += ["", "## bpb(α): chunks whose longest common run with their neighbours is ≤ α of the chunk",
              "", f"Share of evaluated chunks with r(C) ≥ 0.5: {e['share_r_ge_0.5']:.1%}.", "",
              "| model | " + " | ".join(f"α ≤ {a:g}" for a in alphas) + " |",
              "|---|" + "---|" * len(alphas)]
    for x in r["rows"]:
        cells = [f"{p['bpb']:.4f} {ci(p['ci95'])} ({p['chunks']})" if p["chunks"] else "– (0)"
                 for p in x["by_overlap"]]
        lines.append(f"| {x['model']} | " + " | ".join(cells) + " |")
    if r["database_size"]:
        lines += ["", "## Database size (the same checkpoint, no retraining; exact search)", "",
                  "| documents in the database | chunks | RETRO[ON] bpb | 95% CI |",
                  "|---|---|---|---|"]
        lines += [f"| {p['documents']} ({p['documents_share']:.0%}) | {p['chunks']:,} | {p['bpb']:.4f} | "
                  f"{ci(p['ci95'])} |" for p in r["database_size"]]
    flags = "".join(f" --compare {x}" for x in r["compared"])
    flags += f" --index-version {ix['version']}" if ix and not ix.get("service") else ""
    flags += f" --index-name {ix['service']}" if ix.get("service") else ""
    flags += f" --eval-corpus {src['eval_corpus']}" if src.get("eval_corpus") else ""
    lines += ["", f"Command: `python jobs/evaluate.py --workdir WORKDIR --run-name {r['run']}{flags}`"]
    text = "\n".join(lines) + "\n"
    return text if markdown else text.replace("`", "")


def format_experiment(x: dict) -> str:
    """jobs/retro_experiment.py's report: what each model cost to train, then the evaluation."""
    params = {row["model"].split(" ")[0]: row["non_embedding_params"] for row in x["evaluation"]["rows"]}
    lines = [f"# Experiment {x['name']}", "",
             f"Identical data, token budget and schedule; the training split holds {x['train_tokens']:,} "
             f"tokens; the database {x['database']['chunks']:,} chunks.", "",
             "| model | run | non-embedding params | steps | tokens | passes over the data | wall time "
             "| median step |", "|---|---|---|---|---|---|---|---|"]
    for role, t in x["training"].items():
        step = f"{t['median_step_s']:.3f} s" if t["median_step_s"] else "n/a"
        lines.append(f"| {role} | {t['run']} | {params.get(t['run'], 0):,} | {t['steps']} | "
                     f"{t['tokens']:,} | {t['passes']:.2f} | {t['wall_time_s']:.0f} s | {step} |")
    ratio = x["step_time_retro_over_baseline"]
    lines += ["", f"RETRO-N ÷ baseline-N median step time: {ratio:.2f}" if ratio else "", ""]
    return "\n".join(lines) + format_evaluation(x["evaluation"])

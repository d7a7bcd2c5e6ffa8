"""Three REALM runs on one corpus, config and step count, compared on the same held-out queries.

    job (one config) ─┬─ <run>-marginal  marginal likelihood, the index refreshed every refresh.every
                      ├─ <run>-stale     marginal likelihood, never refreshed (refresh.every = 0)
                      └─ <run>-jsa       JSA: posterior retriever + MIS (model.objective = jsa), refreshed
       each: driver.run (a run whose summary.json and held-out table exist is read, not rerun)
    ─► per run: held-out metrics with 95% intervals, wall time, refreshes, acceptance, gradient noise
    ─► paired over the same queries (bootstrap by fact): marginal − stale, jsa − marginal
    ─► <workdir>/experiments/<run>-compare/compare.json and the printed table

`python jobs/realm_pretrain.py --compare --workdir W --config configs/realm_knowledge.yaml`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ratray.realm.config import RealmJobConfig
from ratray.workdir import Workdir

VARIANTS = ("marginal", "stale", "jsa")
SHOWN = ("exact_retrieval", "exact_null", "exact_gain", "token_acc_retrieval", "token_acc_null",
         "token_acc_gain", "p_null_mean")


def variant(job: RealmJobConfig, name: str) -> RealmJobConfig:
    """The job for one variant: its run name, and refresh / objective as the variant says."""
    r = dataclasses.replace
    run = r(job.train, run_name=f"{job.train.run_name}-{name}")
    if name == "stale":
        return r(job, train=run, refresh=r(job.refresh, every=0), model=r(job.model, objective="marginal"))
    return r(job, train=run, model=r(job.model, objective="jsa" if name == "jsa" else "marginal"))


def run_all(job: RealmJobConfig, progress: bool = True) -> dict:
    from ratray.realm import driver
    from ratray.realm.heldout import load_rows, paired

    wd = Workdir(job.workdir)
    summaries, rows, reused = {}, {}, []
    for name in VARIANTS:
        v = variant(job, name)
        d = wd.run(v.train.run_name)
        if wd.run_summary(v.train.run_name).is_file() and (d / "heldout_rows.npz").is_file():
            summaries[name] = json.loads(wd.run_summary(v.train.run_name).read_text())
            reused.append(name)
        else:
            summaries[name] = driver.run(v, progress)
        rows[name] = load_rows(d / "heldout_rows.npz")
    k1 = job.model.k - 1
    out = {"runs": {n: _row(summaries[n], k1) for n in VARIANTS}, "reused": reused,
           "paired": {"marginal - stale": paired(rows["marginal"], rows["stale"], k1),
                      "jsa - marginal": paired(rows["jsa"], rows["marginal"], k1)},
           "steps": job.train.steps, "refresh_every": job.refresh.every}
    path = wd.experiment(f"{job.train.run_name}-compare") / "compare.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    out["path"] = str(path)
    return out


def _row(summary: dict, k1: int) -> dict:
    f = summary.get("final", {})
    keys = SHOWN + (f"gold_recall_at_{k1}",)
    m = {k: [f.get(f"val_{k}"), f.get(f"val_{k}_lo"), f.get(f"val_{k}_hi")] for k in keys}
    return {"metrics": m, "wall_time_s": summary.get("wall_time_s"), "steps": summary.get("steps"),
            "scored_queries": f.get("val_scored_queries"), "clusters": f.get("val_clusters"),
            "refreshes": (summary.get("refresh") or {}).get("completed"),
            "jsa_acceptance": f.get("val_jsa_acceptance"), "train_jsa_acceptance": f.get("jsa_acceptance"),
            "retriever_grad_noise": f.get("retriever_grad_noise"), "val_loss": f.get("val_loss")}


def format_compare(out: dict) -> str:
    runs = out["runs"]
    first = next(iter(runs.values()))
    lines = [f"REALM compared on {first['scored_queries']} held-out queries ({first['clusters']} facts), "
             f"{out['steps']} steps each (reused: {', '.join(out['reused']) or 'none'}); 95% intervals"]
    keys = list(first["metrics"])
    lines.append(f"{'':<22}" + "".join(f"{n:>26}" for n in runs))
    for k in keys:
        cells = []
        for n in runs:
            p, lo, hi = runs[n]["metrics"][k]
            cells.append(f"{'-':>26}" if p is None else f"{p:>8.4f} [{lo:.4f}, {hi:.4f}]")
        lines.append(f"{k:<22}" + "".join(f"{c:>26}" for c in cells))
    for k in ("wall_time_s", "refreshes", "jsa_acceptance", "retriever_grad_noise", "val_loss"):
        lines.append(f"{k:<22}" + "".join(f"{_fmt(runs[n][k]):>26}" for n in runs))
    for name, d in out["paired"].items():
        for k, v in d.items():
            lines.append(f"paired {name:<16} {k:<20} {v['delta']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]")
    lines.append(f"written to {out['path']}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

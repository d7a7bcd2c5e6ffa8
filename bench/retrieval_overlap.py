"""Training step time with online async retrieval vs precomputed neighbours, side by side in one run.

    python bench/retrieval_overlap.py [--workdir work-bench] [--steps 40] [--rounds 3]
        [--modes precomputed,online,online:service.nice=10] [--warmup-steps 10] [--out results.json]

Builds (or reuses) a small index, then, every round, trains the same RETRO model on the same data
once per mode — reading precomputed neighbours, or querying the shard actors online with the next
batch's neighbours in flight while the current batch computes (here also with the shard actors'
search threads at a lower priority, `service.nice`) — the order rotated from round to round so
drift on a shared machine cancels; a short discarded run first warms the machine. Printed: per
round the median step time of each mode and each mode's ratio to the first (paired within the
round), the median of those ratios (the headline; target ≤ 1.05: retrieval hidden behind compute),
and for the online runs what the step blocked on (retrieval wait: prefetched search + leakage
filter + widening searches, also as a share of the step) and how many widening searches the filter
forced per request.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ratray.config import load_config  # noqa: E402
from ratray.retro.config import RetroJobConfig  # noqa: E402

BUILD = ["corpus.max_docs=60", "index.factory=Flat", "index.shards=2", "index.recall_queries=50"]
MODEL = ["model.n_layer=4", "model.d_model=128", "model.n_head=4", "model.seq_len=256",
         "model.enc_d_model=64", "model.enc_n_head=4", "train.micro_batch=4", "train.log_every=5",
         "train.eval_sequences=8", "train.checkpoint_every=1000"]


def step_times(workdir: str, run_name: str) -> list[float]:
    from mlflow import MlflowClient

    from ratray.tracking import tracking_uri

    c = MlflowClient(tracking_uri(workdir))
    exp = c.get_experiment_by_name("ratray-bench")
    run = c.search_runs([exp.experiment_id], filter_string=f"tags.`ratray.run_name` = '{run_name}'")[0]
    hist = sorted(c.get_metric_history(run.info.run_id, "step_time_s"), key=lambda m: m.step)
    return [m.value for m in hist[1:]]  # drop the first interval (start-up, JIT, first prefetch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="work-bench")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="precomputed,online,online:service.nice=10",
                   help="comma-separated; the first is the reference; 'mode:key=value:...' adds overrides")
    p.add_argument("--warmup-steps", type=int, default=10, help="a discarded first run (0 = none)")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    import ray

    from ratray.build import build
    from ratray.retro.driver import run

    ray.init(num_cpus=os.cpu_count(), namespace="ratray-bench", log_to_driver=False)
    base = BUILD + MODEL + [f"workdir={a.workdir}", f"train.steps={a.steps}", "experiment=ratray-bench"]
    build(load_config(RetroJobConfig, None, base), progress=True)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    ref = modes[0]
    tag = time.strftime("%H%M%S")

    def one(mode: str, name: str, steps: int, more: tuple = ()) -> dict:
        kind, *extra = mode.split(":")
        job = load_config(RetroJobConfig, None, base + [f"train.retrieval={kind}", f"train.run_name={name}",
                                                        f"train.steps={steps}"] + extra + list(more))
        s = run(job, progress=False)
        times = step_times(a.workdir, name)
        return {"median_step_s": statistics.median(times), "mean_step_s": statistics.mean(times),
                "intervals": len(times), "final": s["final"]}

    if a.warmup_steps:  # the first run after the build pays for a cold machine: not counted
        one(modes[-1], f"bench-warmup-{tag}", a.warmup_steps, ("train.warmup_steps=0",))
    rounds = []
    for r in range(a.rounds):
        res = {}
        order = modes[r % len(modes):] + modes[: r % len(modes)]  # rotated: each mode in each place
        for mode in order:
            res[mode] = one(mode, f"bench-{tag}-r{r}-m{modes.index(mode)}", a.steps)
        res["ratio"] = {m: res[m]["median_step_s"] / res[ref]["median_step_s"] for m in modes[1:]}
        line = [f"round {r + 1} ({' -> '.join(order)}): median step " +
                ", ".join(f"{m} {res[m]['median_step_s']:.3f} s" for m in modes)]
        for m in modes[1:]:
            f = res[m]["final"]
            line.append(f"  {m} / {ref} {res['ratio'][m]:.3f}" + (
                f" | blocked on retrieval {f['retrieval_wait_ms']:.1f} ms/step "
                f"({100 * f['retrieval_wait_ms'] / 1e3 / res[m]['median_step_s']:.1f}% of the step), in flight "
                f"{f.get('retrieval_inflight_ms', 0):.0f} ms, widening searches "
                f"{f.get('retrieval_widen_searches', 0):.2f}/request (last interval)"
                if "retrieval_wait_ms" in f else ""))
        print("\n".join(line), flush=True)
        rounds.append(res)
    print()
    summary = {}
    for m in modes[1:]:
        ratios = [x["ratio"][m] for x in rounds]
        summary[m] = statistics.median(ratios)
        print(f"{m} / {ref} step-time ratio, paired per round: median {summary[m]:.3f} "
              f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}; target <= 1.05)")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"ratio": summary, "modes": modes, "rounds": rounds}, fh, indent=2, default=str)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

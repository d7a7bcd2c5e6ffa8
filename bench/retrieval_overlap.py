"""Training step time with online async retrieval vs precomputed neighbours, side by side in one run.

    python bench/retrieval_overlap.py [--workdir work-bench] [--steps 40] [--rounds 3] [--out results.json]

Builds (or reuses) a small index, then, every round, trains the same RETRO model on the same data
twice — once reading precomputed neighbours, once querying the shard actors online with the next
batch's neighbours in flight while the current batch computes — the order alternating from round to
round so drift on a shared machine cancels. Printed: per round the median step time of each mode
and their ratio (paired within the round), the median of those ratios (the headline; target
≤ 1.05: retrieval hidden behind compute), and for the online runs what the step blocked on
(retrieval wait: prefetched search + leakage filter + widening searches) and how many widening
searches the filter forced per request.
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
    p.add_argument("--out", default=None)
    a = p.parse_args()

    import ray

    from ratray.build import build
    from ratray.retro.driver import run

    ray.init(num_cpus=os.cpu_count(), namespace="ratray-bench", log_to_driver=False)
    base = BUILD + MODEL + [f"workdir={a.workdir}", f"train.steps={a.steps}", "experiment=ratray-bench"]
    build(load_config(RetroJobConfig, None, base), progress=True)
    tag = time.strftime("%H%M%S")
    rounds = []
    for r in range(a.rounds):
        res = {}
        for mode in (("precomputed", "online") if r % 2 == 0 else ("online", "precomputed")):
            name = f"bench-{mode}-{tag}-r{r}"
            job = load_config(RetroJobConfig, None, base + [f"train.retrieval={mode}",
                                                            f"train.run_name={name}"])
            s = run(job, progress=False)
            times = step_times(a.workdir, name)
            res[mode] = {"median_step_s": statistics.median(times), "mean_step_s": statistics.mean(times),
                         "intervals": len(times), "final": s["final"]}
        res["ratio"] = res["online"]["median_step_s"] / res["precomputed"]["median_step_s"]
        f = res["online"]["final"]
        print(f"round {r + 1}: median step precomputed {res['precomputed']['median_step_s']:.3f} s, "
              f"online {res['online']['median_step_s']:.3f} s, ratio {res['ratio']:.3f} | online: "
              f"retrieval wait {f.get('retrieval_wait_ms', 0):.1f} ms, in flight "
              f"{f.get('retrieval_inflight_ms', 0):.1f} ms, widening searches "
              f"{f.get('retrieval_widen_searches', 0):.2f} per request (last interval)", flush=True)
        rounds.append(res)
    ratios = [x["ratio"] for x in rounds]
    ratio = statistics.median(ratios)
    print(f"\nonline / precomputed step-time ratio, paired per round: median {ratio:.3f} "
          f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}; target <= 1.05)")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"ratio": ratio, "rounds": rounds}, fh, indent=2, default=str)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

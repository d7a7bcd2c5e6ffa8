"""Pretrain RETRO (or the baseline) with Ray Train + DeepSpeed workers and sharded index actors.

    python jobs/retro_pretrain.py --workdir work [--config configs/demo.yaml] [--set train.steps=100]
    ray job submit --working-dir . -- python jobs/retro_pretrain.py --workdir $PWD/work

Needs an index built by jobs/build_index.py in the same workdir (--build-index builds it first).
Re-running with the same --run-name resumes from its last checkpoint.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, load_job, parse_job_args, run_job  # noqa: E402  (job env first)
from ratray.retro.config import RetroJobConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--corpus", default=None, help="corpus for --build-index (default: stdlib source)")
    p.add_argument("--workdir", default=None, help="folder with the index; runs land in <workdir>/runs")
    p.add_argument("--model", dest="model_type", choices=["retro", "baseline"], default=None)
    p.add_argument("--run-name", default=None, help="Ray Train run name (same name = resume)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (train.steps)")
    p.add_argument("--retrieval", choices=["precomputed", "online"], default=None)
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="RETROfit: load this baseline run's decoder, freeze it, train encoder + CCA")
    p.add_argument("--build-index", action="store_true", help="build the index first if needed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = parse_job_args(p, argv)

    def work() -> str:
        job = load_job(RetroJobConfig, a, {
            "corpus.path": a.corpus, "workdir": a.workdir, "model_type": a.model_type,
            "train.run_name": a.run_name, "train.steps": a.steps, "train.retrieval": a.retrieval,
            "init_from": a.init_from})
        from ratray.eval.report import format_summary
        from ratray.retro import driver

        if a.build_index:
            from ratray.build import build

            build(job, progress=not a.quiet)
        driver.resolve(job)  # every config check, before any work
        return format_summary(driver.run(job, progress=not a.quiet))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())

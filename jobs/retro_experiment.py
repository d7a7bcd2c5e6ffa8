"""RETRO against its baselines in one command: baseline-N, baseline-4N (about 4x its non-embedding
parameters) and RETRO-N trained on identical data, token count and schedule [+ a RETROfit of
baseline-N], all evaluated on the same bytes with 95% intervals (bootstrap over documents).

    python jobs/retro_experiment.py --workdir work --config configs/demo.yaml [--retrofit]
    ray job submit --working-dir . -- python jobs/retro_experiment.py --workdir $PWD/work --corpus PATH

Writes <workdir>/experiments/<name>/experiment.{json,md}; each run's evaluation under its run folder.
Re-running resumes: finished runs are reused, interrupted ones resume from their checkpoints.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, load_job, parse_job_args, run_job  # noqa: E402  (job env first)
from ratray.retro.config import RetroJobConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--corpus", default=None,
                   help="file or folder (txt/JSONL/Parquet); default: stdlib source")
    p.add_argument("--workdir", default=None, help="chunk store, index, runs and the report land here")
    p.add_argument("--name", default="experiment", help="prefix of the run names and the report folder")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every model (train.steps)")
    p.add_argument("--retrofit", action="store_true", help="also RETROfit baseline-N (decoder frozen)")
    p.add_argument("--retrofit-share", type=float, default=0.25, help="RETROfit steps ÷ baseline steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = parse_job_args(p, argv)

    def work() -> str:
        from ratray.config import ConfigError

        job = load_job(RetroJobConfig, a, {"corpus.path": a.corpus, "workdir": a.workdir,
                                           "train.steps": a.steps})
        if not 0 < a.retrofit_share <= 1:
            raise ConfigError(f"--retrofit-share {a.retrofit_share}: must be in (0, 1]")
        from ratray.eval.report import format_experiment
        from ratray.retro.experiment import run_experiment

        x = run_experiment(job, a.name, a.retrofit, a.retrofit_share, progress=not a.quiet)
        return format_experiment(x)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())

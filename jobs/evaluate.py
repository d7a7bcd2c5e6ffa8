"""Evaluate a trained RETRO (or baseline) run: held-out bits-per-byte with retrieval on and off and
of other runs on the same bytes (baselines; RETRO runs such as a RETROfit, with retrieval on),
bpb(α) by overlap with the neighbours, a database-size curve without retraining, 95% intervals by
bootstrap over documents.

    python jobs/evaluate.py --workdir work --run-name retro-demo [--compare base-demo ...]
    python jobs/evaluate.py --workdir work --run-name retro-demo --index-version 2 --eval-corpus docs/
    ray job submit --working-dir . -- python jobs/evaluate.py --workdir $PWD/work --run-name retro-demo

Writes <workdir>/runs/<run>/eval/ (report.json, report.md, PNG plots, per-chunk and per-document
scores) and attaches it to the run's MLflow record.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, parse_job_args, run_job  # noqa: E402  (job env first)


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--workdir", default="work")
    p.add_argument("--run-name", required=True, help="the run to evaluate")
    p.add_argument("--compare", action="append", default=[], metavar="RUN",
                   help="another run on the same data: a baseline, or a RETRO run such as a "
                        "RETROfit (repeatable)")
    p.add_argument("--fractions", default="0.1,0.3,1.0",
                   help="shares of the database's documents for the size curve ('' = none)")
    p.add_argument("--sequences", type=int, default=0, help="validation sequences scored (0 = all)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--index-version", type=int, default=None, metavar="V",
                   help="search neighbours now in version V of the workdir's index (e.g. before "
                        "and after jobs/update_index.py), not the run's own table")
    p.add_argument("--index-name", default=None, metavar="NAME",
                   help="search through running shard actors NAME (their serving version)")
    p.add_argument("--eval-corpus", default=None, metavar="PATH",
                   help="score the documents at PATH (file or folder, read like the corpus) "
                        "instead of the validation split")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = parse_job_args(p, argv, config=False)

    def work() -> str:
        from ratray.config import ConfigError
        from ratray.eval.report import format_evaluation
        from ratray.retro.evaluate import evaluate

        try:
            fractions = tuple(float(f) for f in a.fractions.split(",") if f.strip())
        except ValueError:
            raise ConfigError(f"--fractions {a.fractions!r}: expected numbers like 0.1,0.3,1.0") from None
        if any(not 0 < f <= 1 for f in fractions):
            raise ConfigError(f"--fractions {a.fractions!r}: every share must be in (0, 1]")
        if a.index_version is not None and a.index_version < 1:
            raise ConfigError(f"--index-version {a.index_version}: versions start at 1")
        report = evaluate(a.workdir, a.run_name, tuple(a.compare), fractions, a.sequences,
                          n_boot=a.resamples, progress=not a.quiet, index_version=a.index_version,
                          index_name=a.index_name, eval_corpus=a.eval_corpus)
        return format_evaluation(report, markdown=False)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())

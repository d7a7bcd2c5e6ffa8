"""Print a finished run's result — RETRO (validation bits-per-byte RETRO[ON] vs RETRO[OFF]), the
baseline, or REALM (masked-token accuracy with retrieval vs the null document) — where the
checkpoint and the MLflow run are, and the command that opens the MLflow UI.

    python jobs/show_run.py --workdir work --run-name retro-demo
    python jobs/show_run.py --workdir work --run-name realm-demo
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, parse_job_args, run_job  # noqa: E402  (job env first)
from ratray.eval.report import format_summary, load_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--workdir", default="work")
    p.add_argument("--run-name", default="retro-demo")
    a = parse_job_args(p, argv, config=False)
    return run_job(lambda: format_summary(load_summary(a.workdir, a.run_name)))


if __name__ == "__main__":
    sys.exit(main())

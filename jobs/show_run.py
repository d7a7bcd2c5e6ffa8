"""Print a finished run's result: validation bits-per-byte RETRO[ON] vs RETRO[OFF], where the
checkpoint and the MLflow run are, and the command that opens the MLflow UI.

    python jobs/show_run.py --workdir work --run-name retro-demo
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ratray.cli import run_job  # noqa: E402
from ratray.train.retro import format_summary, load_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="work")
    p.add_argument("--run-name", default="retro-demo")
    a = p.parse_args(argv)
    return run_job(lambda: format_summary(load_summary(a.workdir, a.run_name)))

if __name__ == "__main__":
    sys.exit(main())

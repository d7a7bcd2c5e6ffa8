"""Pretrain REALM (learned retriever, asynchronously refreshed index) with Ray Train + DeepSpeed.

    python jobs/realm_pretrain.py --workdir work [--config configs/realm_demo.yaml] [--set refresh.every=20]
    python jobs/realm_pretrain.py --workdir work --config configs/realm_knowledge.yaml --compare
    ray job submit --working-dir . -- python jobs/realm_pretrain.py --workdir $PWD/work --config configs/realm_demo.yaml

Builds (or reuses) the wordpiece chunk store and the run's first index, starts the shard actors and
the refresh service, trains. Re-running with the same --run-name resumes from its last checkpoint,
index version included.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, load_job, parse_job_args, run_job  # noqa: E402  (job env first)
from ratray.realm.config import RealmJobConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--corpus", default=None, help="knowledge corpus (default: stdlib source)")
    p.add_argument("--workdir", default=None, help="chunk stores and runs land here")
    p.add_argument("--run-name", default=None, help="Ray Train run name (same name = resume)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (train.steps)")
    p.add_argument("--refresh-every", type=int, default=None, help="steps between index refreshes (0 = never)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compare", action="store_true", help="three runs of this config, compared on the "
                   "same held-out queries: marginal likelihood refreshed / never refreshed, JSA")
    a = parse_job_args(p, argv)

    def work() -> str:
        job = load_job(RealmJobConfig, a, {
            "corpus.path": a.corpus, "workdir": a.workdir, "train.run_name": a.run_name,
            "train.steps": a.steps, "refresh.every": a.refresh_every})
        from ratray.eval.report import format_summary
        from ratray.realm import compare, driver

        if a.compare:
            return compare.format_compare(compare.run_all(job, progress=not a.quiet))
        return format_summary(driver.run(job, progress=not a.quiet))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())

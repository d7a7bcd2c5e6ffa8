"""Build the chunk store, embeddings and sharded FAISS index; write summary.json.

    python jobs/build_index.py --corpus PATH --workdir DIR [--shards N] [--index FACTORY]
    ray job submit --working-dir . -- python jobs/build_index.py --workdir /shared/work

Starts nothing permanent: the shard actors used to measure recall are shut down at the end.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, load_job, parse_job_args, run_job  # noqa: E402  (job env first)
from ratray.retro.config import RetroJobConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--corpus", default=None, help="file or folder (txt/JSONL/Parquet); default: stdlib source")
    p.add_argument("--workdir", default=None, help="output folder (default: config workdir, 'work')")
    p.add_argument("--shards", type=int, default=None, help="number of index shards / actors")
    p.add_argument("--index", default=None, help="FAISS factory string or 'auto'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = parse_job_args(p, argv)

    def work() -> str:
        # the RETRO job config is a superset: one YAML file serves both jobs
        cfg = load_job(RetroJobConfig, a, {"corpus.path": a.corpus, "workdir": a.workdir,
                                           "index.shards": a.shards, "index.factory": a.index})
        from ratray.build import build, format_build

        return format_build(build(cfg, progress=not a.quiet))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())

"""Build the chunk store, embeddings and sharded FAISS index; write summary.json.

    python jobs/build_index.py --corpus PATH --workdir DIR [--shards N] [--index FACTORY]
    ray job submit --working-dir . -- python jobs/build_index.py --workdir /shared/work

Starts nothing permanent: the shard actors used to measure recall are shut down at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ratray.cli import job_env, run_job  # noqa: E402

job_env()  # before torch / transformers / DeepSpeed are imported

from ratray.config import RetroJobConfig, add_config_args, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="file or folder (txt/JSONL/Parquet); default: stdlib source")
    p.add_argument("--workdir", default=None, help="output folder (default: config workdir, 'work')")
    p.add_argument("--shards", type=int, default=None, help="number of index shards / actors")
    p.add_argument("--index", default=None, help="FAISS factory string or 'auto'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def work() -> str:
        # the training config is a superset: one YAML file serves both jobs
        cfg = load_config(RetroJobConfig, a.config, a.overrides, extra={
            "corpus.path": a.corpus, "workdir": a.workdir, "index.shards": a.shards, "index.factory": a.index})
        from ratray.build import build

        s = build(cfg, progress=not a.quiet)
        return (json.dumps({k: s[k] for k in ("counts", "skipped", "index", "recall", "timings")}, indent=2)
                + f"\nsummary: {s['index']['path']}/summary.json")

    return run_job(work)

if __name__ == "__main__":
    sys.exit(main())

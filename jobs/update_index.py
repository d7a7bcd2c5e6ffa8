"""Update a serving database: append documents, remove documents, publish a new index version that
running shard actors hot-swap (a training or generation job keeps searching through it).

    python jobs/update_index.py --workdir DIR --add PATH [--remove IDS_FILE] [--remove-doc ID ...]
    ray job submit --working-dir . -- python jobs/update_index.py --workdir $PWD/work --add new/

--add: a file or folder read with the corpus readers and settings of the workdir's chunk store
(same validation, errors and counted skips); its documents go to the "db" split (retrieval only,
never trained on); an id the store already holds replaces that document. --remove: a file with
one document id per line; --remove-doc: one id (repeatable). Prints documents read/skipped,
chunks added/removed, the drift from the trained quantizers (retrain advice), the new version,
the swap time and chunks/s. See ratray/index/update.py.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, load_job, parse_job_args, run_job  # noqa: E402  (job env first)


def read_ids(path: str) -> list[str]:
    """One document id per line (blank lines and #-comments ignored)."""
    from ratray.config import ConfigError

    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--remove {path}: cannot read ({e})") from None
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--workdir", default=None, help="the workdir (default: config workdir, 'work')")
    p.add_argument("--add", default=None, metavar="PATH", help="file or folder of documents to add")
    p.add_argument("--remove", default=None, metavar="IDS_FILE", help="document ids, one per line")
    p.add_argument("--remove-doc", action="append", default=[], metavar="ID",
                   help="a document id to remove (repeatable)")
    p.add_argument("--service-name", default=None,
                   help="the shard service to swap (default: every one serving this index)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = parse_job_args(p, argv)

    def work() -> str:
        import ray

        from ratray.index.factory import IndexBuildError
        from ratray.index.update import UpdateJobConfig, format_update, update_index

        cfg = load_job(UpdateJobConfig, a, {"workdir": a.workdir})
        remove = [*(read_ids(a.remove) if a.remove else []), *a.remove_doc]
        if not ray.is_initialized():
            ray.init(namespace=cfg.service.namespace, log_to_driver=False)
        try:
            r = update_index(cfg.workdir, a.add, remove, a.service_name, cfg, progress=not a.quiet)
        except IndexBuildError as e:
            from ratray.config import ConfigError

            raise ConfigError(str(e)) from None
        return format_update(r)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())

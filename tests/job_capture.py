"""The job config a `jobs/*.py` entry point would start work with, for a given argv.

The job script's own main() parses the argv (its parser, `--config`, `--set`, its flags and the
config loader's checks), and the library entry points the jobs call through module attributes at
call time are replaced by a capture that stops the job there: so a deployment's command line is
checked exactly as the job would read it, without building an index or training anything.
Used by tests/test_k8s_manifests.py (RayJob entrypoints) and tests/test_cluster_launcher.py (the
cluster launcher's documented job).
"""
from __future__ import annotations

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB_CONFIGS = {"retro_pretrain.py": "RetroJobConfig", "realm_pretrain.py": "RealmJobConfig"}


class _Captured(Exception):
    pass


def entry_points() -> list[tuple[object, str]]:
    """(module, attribute) of every library call a job makes once its config is loaded."""
    import ratray.build
    import ratray.realm.driver
    import ratray.retro.driver

    return [(ratray.build, "build"), (ratray.retro.driver, "resolve"), (ratray.retro.driver, "run"),
            (ratray.realm.driver, "run")]


def job_from_argv(script: Path, args: list[str], monkeypatch):
    """Run jobs/<script>'s main(args) up to its first library call; return the job config it
    passed. AssertionError when main() returns before that (a config error: exit status 2)."""
    assert script.parent == ROOT / "jobs" and script.name in JOB_CONFIGS, script
    captured = {}

    def capture(job, *a, **k):
        captured["job"] = job
        raise _Captured

    for module, attr in entry_points():
        monkeypatch.setattr(module, attr, capture)
    job_module = importlib.import_module(f"jobs.{script.stem}")
    try:
        rc = job_module.main(args)
    except _Captured:
        return captured["job"]
    raise AssertionError(f"{script.name} {args} exited with {rc} before starting (a config error)")

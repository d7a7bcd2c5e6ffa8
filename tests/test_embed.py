"""Frozen retriever embeddings: real sentence-BERT through a Ray Data actor pool, content-keyed cache."""
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ratray.config import EmbedConfig
from ratray.index.embed import EmbeddingCache, embed_with_cache
from ratray.pretrained import PretrainedModelError, model_id, model_path


@pytest.fixture(scope="module")
def texts():
    src = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    lines = [ln for ln in src.splitlines() if ln.strip()]
    return ["\n".join(lines[i:i + 6]) for i in range(0, 6 * 24, 6)]  # 24 real chunks of code


def test_ray_data_embeddings_match_in_process_and_are_cached(ray_session, texts, tmp_path):
    cfg = EmbedConfig(batch_size=8, num_actors=1)
    v, s = embed_with_cache(texts, cfg, tmp_path)  # Ray Data actor pool
    assert v.shape == (len(texts), 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert s.embedded == len(set(texts)) and s.cached == 0
    # same model in-process gives the same vectors (order preserved through the actor pool)
    ref, s_ref = embed_with_cache(texts, cfg, tmp_path / "other", use_ray=False)
    assert np.allclose(v, ref, atol=1e-4)
    # a rebuild embeds nothing
    v2, s2 = embed_with_cache(texts, cfg, tmp_path)
    assert s2.embedded == 0 and s2.cached == len(texts)
    assert np.array_equal(v, v2)


def test_embedding_parts_are_cached_as_they_finish_so_a_killed_build_keeps_them(
        ray_session, texts, tmp_path, monkeypatch):
    """With embed.part_size below the texts' count, parts reach the cache while the actor pool
    still runs: a build that dies after the first part (here: its second write fails) keeps it,
    and the re-run embeds only the rest."""
    cfg = EmbedConfig(batch_size=4, num_actors=1, part_size=8)
    n = len(set(texts))
    assert n > 2 * cfg.part_size
    real_add, writes = EmbeddingCache.add, []

    def add_then_die(self, keys, vectors):
        if writes:
            raise RuntimeError("killed")
        writes.append(len(keys))
        real_add(self, keys, vectors)

    monkeypatch.setattr(EmbeddingCache, "add", add_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        embed_with_cache(texts, cfg, tmp_path)
    monkeypatch.setattr(EmbeddingCache, "add", real_add)
    assert cfg.part_size <= writes[0] < n and len(EmbeddingCache(tmp_path, cfg.model)) == writes[0]
    v, s = embed_with_cache(texts, cfg, tmp_path)
    assert s.embedded == n - writes[0]  # only what the first run had not cached
    ref, _ = embed_with_cache(texts, cfg, tmp_path / "clean", use_ray=False)
    assert np.allclose(v, ref, atol=1e-4)


def test_only_new_chunks_reach_the_encoder(texts, tmp_path):
    cfg = EmbedConfig(batch_size=8)
    embed_with_cache(texts[:10], cfg, tmp_path, use_ray=False)
    v, s = embed_with_cache(texts[:10] + ["def brand_new(): return 42"] + texts[:3], cfg, tmp_path,
                            use_ray=False)
    assert s.embedded == 1 and s.cached == 13
    assert len(EmbeddingCache(tmp_path, cfg.model)) == 11
    # duplicates of one text get the identical vector
    assert np.array_equal(v[0], v[11])


def test_embeddings_are_semantic(texts, tmp_path):
    q = ["import json\nimport re", "the cat sat on the mat", "def decode(self, s): return self.raw_decode(s)"]
    v, _ = embed_with_cache(q + ["import re\nimport json", "a cat was sitting on a mat"], EmbedConfig(),
                            tmp_path, use_ray=False)
    sims = v[:3] @ v[3:].T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(PretrainedModelError, match="never downloaded"):
        model_path(str(tmp_path / "no-such-model"))


def test_a_build_killed_while_writing_a_cache_part_leaves_nothing_the_next_build_trips_on(texts, tmp_path):
    # a real SIGKILL half way through writing a part (before: its temp name matched part-*.npz and
    # every later build failed with BadZipFile)
    script = f"""
import os, signal
import numpy as np
import ratray.index.embed as embed
from ratray.config import EmbedConfig

def torn_savez(file, **arrays):
    with open(file, "wb") as f:
        f.write(b"PK\\x03\\x04 half a zip")
    os.kill(os.getpid(), signal.SIGKILL)

embed.np.savez = torn_savez
embed.EmbeddingCache({str(tmp_path)!r}, EmbedConfig().model).add(
    embed.content_keys(["x"]), np.zeros((1, 384), np.float32))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], timeout=120)
    assert r.returncode == -signal.SIGKILL
    cache = EmbeddingCache(tmp_path, EmbedConfig().model)
    assert cache._parts() == [] and len(cache) == 0
    v, s = embed_with_cache(texts[:4], EmbedConfig(batch_size=8), tmp_path, use_ray=False)
    assert s.embedded == 4 and s.discarded_parts == 0


def test_an_unreadable_cache_part_is_discarded_counted_and_embedded_again(texts, tmp_path):
    cfg = EmbedConfig(batch_size=8)
    ref, _ = embed_with_cache(texts[:6], cfg, tmp_path, use_ray=False)
    cache = EmbeddingCache(tmp_path, cfg.model)
    (part,) = cache._parts()
    (cache.dir / "part-00001-torn.npz").write_bytes(part.read_bytes()[:300])  # a torn part
    part.write_bytes(part.read_bytes()[:100])  # and the good one truncated too
    v, s = embed_with_cache(texts[:6], cfg, tmp_path, use_ray=False)
    assert s.discarded_parts == 2 and s.embedded == 6 and s.as_dict()["discarded_parts"] == 2
    assert np.allclose(v, ref, atol=1e-5)
    _, s2 = embed_with_cache(texts[:6], cfg, tmp_path, use_ray=False)
    assert s2.cached == 6 and s2.discarded_parts == 0


def test_weights_retrained_in_place_get_a_new_cache_key(tmp_path):
    # same file sizes, same JSON: only the weights' bytes differ (before: the same model id, so
    # the cache served vectors of the old weights)
    model = tmp_path / "encoder"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    weights = model / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    before = model_id(str(model))
    weights.write_bytes(bytes(reversed(range(256))) * 64)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    after = model_id(str(model))
    assert before != after and before.startswith("encoder-") and after.startswith("encoder-")
    assert EmbeddingCache(tmp_path / "c", str(model)).dir.name == after

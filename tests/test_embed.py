"""Frozen retriever embeddings: real sentence-BERT through a Ray Data actor pool, content-keyed cache."""
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ratray.config import EmbedConfig
from ratray.index.embed import EmbeddingCache, embed_with_cache
from ratray.pretrained import PretrainedModelError, model_path


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

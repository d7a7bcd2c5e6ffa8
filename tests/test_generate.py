"""RETRO generation: the KV cache reproduces the full forward, retrieval runs once per completed
chunk through the real shard actors and feeds the next chunk, bad input fails clearly, and
jobs/generate.py prints the continuation and the neighbours used."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ratray.config import ConfigError, ServiceConfig
from ratray.retro.config import RetroConfig
from ratray.retro.generate import GenerateSettings, Retriever, generate, read_prompt

K = 2


@pytest.fixture(scope="module")
def db(small_workdir):
    """The small workdir's chunk store, its 2-shard index served by actors, the frozen encoder."""
    from ratray.data.store import ChunkStore
    from ratray.index.embed import load_encoder
    from ratray.index.service import ShardedIndex
    from ratray.index.store import load_manifest

    wd, cfg, _ = small_workdir
    store = ChunkStore.open(wd / "chunks" / load_manifest(wd / "index").chunk_store)
    index = ShardedIndex.launch(str(wd / "index"), ServiceConfig(name="gen-test", namespace="ratray-tests"))
    yield store, index, load_encoder(cfg.embed.model, "cpu")
    index.shutdown()


def model_for(store, **over):
    """An untrained RETRO for the store's vocabulary and 32-token chunks; CCA not zero-initialised,
    so the neighbours change the logits."""
    from ratray.retro.model import Retro

    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=store.tokenizer.vocab_size, pad_id=store.tokenizer.pad_id,
                      chunk_tokens=store.chunk_tokens, seq_len=128, n_layer=3, n_head=2, d_model=64,
                      cca_layers=(2, 3), enc_layers=1, enc_d_model=32, enc_n_head=2,
                      zero_init_cca=False, **over)
    return Retro(cfg).eval()


def prompt_of(store, n: int) -> list[int]:
    """The first n tokens of a validation document (text the model never trained on)."""
    ids = store.split_ids("val")[:4]
    return store.tokens(ids).reshape(-1)[:n].tolist()


@pytest.mark.parametrize("match,slope", [(2.0, 2.0), (0.0, 0.0), (1.0, 0.0)])
def test_decode_step_gives_forwards_logits_position_by_position(match, slope):
    """Retro.decode_step on a batch of 2, m = 4, neighbours entering with each chunk's last token
    (one of them partly pad): forward's logits at every position, with and without retrieval."""
    from ratray.retro.model import DecodeCache, Retro

    torch.manual_seed(0)
    model = Retro(RetroConfig.tiny(zero_init_cca=False, cca_match_bias=match, cca_prior_slope=slope,
                                   n_layer=3, cca_layers=(2, 3))).eval()
    b, n, m = 2, 16, 4
    idx = torch.randint(1, 64, (b, n))
    nb = torch.randint(0, 64, (b, n // m, 3, 8))  # k' = 3, r' = 8
    nb[0, 1, 0, :5] = 0  # pad keys
    with torch.no_grad():
        on, off = model(idx, nb)[0], model(idx, None)[0]
    assert (on - off).abs().max() > 1e-3
    c_on, c_off = DecodeCache(len(model.blocks)), DecodeCache(len(model.blocks))
    for p in range(n):
        got_on = model.decode_step(idx[:, p], c_on, nb[:, p // m] if p % m == m - 1 else None)
        torch.testing.assert_close(got_on, on[:, p], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode_step(idx[:, p], c_off), off[:, p], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="completes a chunk"):
        model.decode_step(idx[:, 0], c_on, nb[:, 0])  # position 16: not a chunk's last token


def test_kv_cached_generation_equals_the_full_forward_across_chunk_boundaries(db):
    store, index, enc = db
    model = model_for(store)
    prompt = prompt_of(store, 40)  # m = 32: chunks complete at 31, 63, 95 (prompt and generated)
    runs = [generate(model, prompt, 60, Retriever(index, store, enc, K), cache=c, keep_logits=True)
            for c in (True, False)]
    cached, full = runs
    assert cached.tokens == full.tokens and len(cached.tokens) == 60
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [c.chunk for c in cached.chunks] == [0, 1, 2]
    assert [c.ids.tolist() for c in cached.chunks] == [c.ids.tolist() for c in full.chunks]
    off = generate(model, prompt, 60, None, keep_logits=True)
    # the neighbours matter: without them the logits differ
    assert max((a - b).abs().max().item() for a, b in zip(cached.logits, off.logits)) > 1e-3


def test_each_completed_chunk_retrieves_once_and_feeds_the_next_chunk(db):
    """The neighbours are the index's answer for the chunk's own text, and the generated logits are
    forward's with those neighbours in the chunk's slot (RETRO's causal alignment)."""
    from ratray.index.embed import encode

    store, index, enc = db
    model = model_for(store)
    prompt = prompt_of(store, 20)
    retriever = Retriever(index, store, enc, K)
    g = generate(model, prompt, 70, retriever, keep_logits=True)
    seq = g.prompt + g.tokens  # 90 tokens; fed: 0..88 → chunks 0 (31) and 1 (63) complete
    assert retriever.searches == len(g.chunks) == 2
    m = store.chunk_tokens
    table = torch.full((1, 3, K, 2 * m), store.tokenizer.pad_id, dtype=torch.long)
    for r in g.chunks:
        text = store.tokenizer.decode(seq[r.chunk * m: (r.chunk + 1) * m])
        assert r.text == text
        direct = index.search(encode(enc, [text], 8), K)
        assert r.ids.tolist() == direct.ids[0].tolist() and r.version == direct.version
        table[0, r.chunk] = torch.from_numpy(store.with_continuation(direct.ids[0]).astype(np.int64))
        assert torch.equal(r.tokens, table[0, r.chunk])
    idx = torch.tensor(seq + [store.tokenizer.pad_id] * 6)[None]  # 96 = 3 chunks
    with torch.no_grad():
        logits = model(idx, table)[0][0]
    for i, lg in enumerate(g.logits):  # token len(prompt)+i was sampled from position len(prompt)+i-1
        torch.testing.assert_close(lg, logits[len(prompt) + i - 1], atol=1e-4, rtol=1e-4)
    assert g.tokens == [int(logits[len(prompt) + i - 1].argmax()) for i in range(len(g.tokens))]


def test_without_retrieval_the_cache_path_is_retro_off(db):
    store, index, enc = db
    model = model_for(store)
    prompt = prompt_of(store, 30)
    retriever = Retriever(index, store, enc, K)
    cached = generate(model, prompt, 50, None, keep_logits=True)
    full = generate(model, prompt, 50, None, cache=False, keep_logits=True)
    assert cached.tokens == full.tokens and cached.chunks == []
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    idx = torch.tensor(cached.prompt + cached.tokens + [0] * 16)[None]
    with torch.no_grad():
        off = model(idx, None)[0][0]  # RETRO[OFF] as evaluate scores it
    torch.testing.assert_close(cached.logits[-1], off[len(prompt) + 48], atol=1e-4, rtol=1e-4)
    # a baseline model never retrieves, even when handed a retriever
    base = model_for(store, model="baseline")
    assert generate(base, prompt, 40, retriever).chunks == [] and retriever.searches == 0


def test_sampling_is_seeded_and_top_k_1_is_greedy(db):
    store, _, _ = db
    model = model_for(store)
    prompt = prompt_of(store, 10)
    a = generate(model, prompt, 30, temperature=1.0, seed=3).tokens
    assert a == generate(model, prompt, 30, temperature=1.0, seed=3).tokens
    assert a != generate(model, prompt, 30, temperature=1.0, seed=4).tokens
    assert generate(model, prompt, 30, temperature=1.0, top_k=1, seed=5).tokens == \
        generate(model, prompt, 30).tokens
    assert store.tokenizer.pad_id not in a


def test_bad_input_fails_with_a_clear_error(db, tmp_path, small_workdir, capsys):
    from jobs.generate import main

    store, _, _ = db
    model = model_for(store)
    with pytest.raises(ConfigError, match="exactly one of --prompt"):
        read_prompt(None, None)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompt(None, str(tmp_path / "nope.txt"))
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="blank.txt: the prompt is empty"):
        read_prompt(None, str(tmp_path / "blank.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.txt: not UTF-8 text"):
        read_prompt(None, str(tmp_path / "latin1.txt"))
    for kw, field in [({"max_tokens": 0}, "--max-tokens"), ({"temperature": -0.5}, "--temperature"),
                      ({"top_k": -1}, "--top-k")]:
        with pytest.raises(ConfigError, match=field):
            GenerateSettings(**kw)
    with pytest.raises(ConfigError, match="prompt: empty"):
        generate(model, [], 5)
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, [5], 5, temperature=-1)
    wd = str(small_workdir[0])
    for argv, msg in [(["--run-name", "nosuch", "--prompt", "x"], "no summary for run 'nosuch'"),
                      (["--run-name", "r", "--prompt", ""], "--prompt: the prompt is empty"),
                      (["--run-name", "r", "--prompt", "x", "--max-tokens", "0"],
                       "--max-tokens: must be >= 1"),
                      (["--run-name", "r", "--prompt-file", str(tmp_path / "nope.txt")], "no such file")]:
        assert main(["--workdir", wd, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err


@pytest.fixture(scope="module")
def trained_run(small_workdir):
    """A tiny RETRO run (1 worker, 2 steps) with a checkpoint, trained by the real driver."""
    from ratray.config import load_config
    from ratray.retro.config import RetroJobConfig
    from ratray.retro.driver import run

    wd, _, _ = small_workdir
    job = load_config(RetroJobConfig, None, [
        f"workdir={wd}", "model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128",
        "model.enc_layers=1", "model.enc_d_model=32", "model.enc_n_head=2", "model.cca_layers=[1,2]",
        "model.zero_init_cca=false", "train.micro_batch=2", "train.steps=2", "train.warmup_steps=1",
        "train.checkpoint_every=2", "train.log_every=2", "train.eval_sequences=2", "train.num_workers=1",
        "train.run_name=gen-run"])
    run(job, progress=False)
    return wd


@pytest.mark.slow
def test_generate_job_prints_the_continuation_and_the_neighbours(db, trained_run, capsys):
    import json

    from jobs.generate import main

    store, _, _ = db
    prompt = store.tokenizer.decode(prompt_of(store, 45))
    base = ["--workdir", str(trained_run), "--run-name", "gen-run", "--prompt", prompt, "--max-tokens", "40"]
    # the running actors of the test's index, found by name
    assert main(base + ["--index-name", "gen-test", "--namespace", "ratray-tests", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["retrieval"] == "on" and len(rep["tokens"]) == 40
    assert [c["chunk"] for c in rep["chunks"]] == [0, 1]  # complete at 31 and 63 (< 45 + 39)
    nb = rep["chunks"][0]["neighbours"]
    assert len(nb) == 2 and nb[0]["doc_id"] == store.doc_ids([nb[0]["chunk_id"]])[0]
    assert rep["chunks"][1]["used_for_generated"] and rep["index"]["launched_for_this_job"] is False
    # its own actors for the job's duration, printed as text; the same greedy tokens
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "--- continuation" in out and "--- neighbours (2 completed chunks" in out
    assert f"#1 chunk {nb[0]['chunk_id']} doc {nb[0]['doc_id']}" in out
    assert store.tokenizer.decode(rep["tokens"]) in out
    assert main(base + ["--no-retrieval"]) == 0
    assert "retrieval off" in capsys.readouterr().out
    # the run trained on 128-token sequences: longer is refused, naming the limit
    assert main(base[:-1] + ["100"]) == 2
    assert "--max-tokens 100 > 128" in capsys.readouterr().err


NEW_FACT = ("The lighthouse keeper of Varnholm island, Edda Quillfeather, painted the tower "
            "cobalt blue in the spring of the great herring run, and every ship that passed "
            "afterwards saluted the blue tower with three short horn blasts before turning north.")


def test_a_database_update_during_generation_is_read_by_the_next_chunk(small_workdir, tmp_path):
    """A document added (and hot-swapped into the running actors) while a generation runs: the
    next completed chunk's search is answered by the new version, and the new chunk's [N, F]
    tokens come from the chunk store opened before the update."""
    import json
    import shutil

    from ratray.data.store import ChunkStore
    from ratray.index.embed import load_encoder
    from ratray.index.service import ShardedIndex
    from ratray.index.store import load_manifest
    from ratray.index.update import UpdateJobConfig, update_index

    src, cfg, _ = small_workdir
    wd = tmp_path / "wd"
    shutil.copytree(src, wd)  # our own copy: the shared workdir is never mutated
    (tmp_path / "add.jsonl").write_text(json.dumps({"id": "isles/varnholm", "text": NEW_FACT}) + "\n")
    svc = ServiceConfig(name="gen-upd", namespace="ratray-tests")
    index = ShardedIndex.launch(str(wd / "index"), svc)
    store = ChunkStore.open(wd / "chunks" / load_manifest(wd / "index").chunk_store)
    n_before, v_before = len(store), index.version()
    updates = []

    class UpdateAfterFirstChunk(Retriever):
        def __call__(self, chunk, tokens):
            r = super().__call__(chunk, tokens)
            if chunk == 0:  # the database changes between two chunks of the generation
                updates.append(update_index(wd, add=tmp_path / "add.jsonl",
                                            cfg=UpdateJobConfig(workdir=str(wd), service=svc)))
            return r

    try:
        m = store.chunk_tokens
        fact = store.tokenizer.encode(NEW_FACT)[:m]  # the new document's first chunk
        prompt = prompt_of(store, m) + fact + fact[:5]
        g = generate(model_for(store), prompt, 3,
                     UpdateAfterFirstChunk(index, store, load_encoder(cfg.embed.model, "cpu"), K))
    finally:
        index.shutdown()
    first, second = g.chunks
    assert len(updates) == 1 and first.version == v_before and second.version > v_before
    new_id = second.ids[0]
    assert new_id >= n_before and first.ids.max() < n_before  # appended after the store was opened
    assert store.doc_ids([new_id])[0] == "isles/varnholm" and second.distances[0] < 1e-3
    assert store.tokens([new_id])[0].tolist() == fact
    assert torch.equal(second.tokens[0], torch.from_numpy(store.with_continuation([new_id])[0]).long())

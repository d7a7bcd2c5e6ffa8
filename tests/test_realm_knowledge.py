"""The knowledge corpus from the interpreter's own tables (ratray/realm/knowledge.py) and REALM's
held-out metrics with intervals (ratray/realm/heldout.py): real tables, a real wordpiece chunk
store, real bootstrap."""
from __future__ import annotations

import http
import json
from collections import defaultdict

import numpy as np
import pytest

from ratray.config import ChunkConfig, ConfigError, CorpusConfig, load_config
from ratray.data.chunks import build_chunk_store
from ratray.data.corpus import iter_documents, split_of
from ratray.data.records import SkipReport
from ratray.realm.config import RealmJobConfig
from ratray.realm.heldout import ROW_FIELDS, gold_hits, scored_queries, summarize
from ratray.realm.knowledge import TABLES, fact_key, facts, gold_blocks, write_corpus
from ratray.realm.masking import make_queries, salient_spans

VAL = 0.3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("knowledge") / "facts.jsonl"
    counts = write_corpus(path, val_fraction=VAL, seed=0, tables=("http", "errno"))
    cfg = CorpusConfig(path=str(path), val_fraction=VAL)
    docs = list(iter_documents(cfg, SkipReport()))
    return path, counts, cfg, docs


@pytest.fixture(scope="module")
def store(corpus):
    path, _, cfg, _ = corpus
    return build_chunk_store(cfg, ChunkConfig(tokenizer="wordpiece", chunk_tokens=48), path.parent / "store",
                             progress=False)


def test_every_table_yields_facts():
    for table in TABLES:
        assert len(facts((table,))) > 20, table


def test_http_facts_come_from_the_interpreter():
    f = {x.key: x for x in facts(("http",))}["http-404"]
    assert f.answer == "404" and http.HTTPStatus(404).phrase in f.block


def test_each_written_ask_masks_exactly_its_answer(corpus):
    _, counts, _, docs = corpus
    answers = {f.key: f.answer for f in facts(("http", "errno"))}
    asks = [d for d in docs if d.doc_id.startswith("ask/")]
    assert len(asks) == counts["asks"] > 0
    for d in asks:
        spans = [d.text[i:j] for i, j, _ in salient_spans(d.text)]
        assert spans == [answers[fact_key(d.doc_id)]], d.doc_id


def test_the_fact_block_states_the_answer(corpus):
    _, _, _, docs = corpus
    answers = {f.key: f.answer for f in facts(("http", "errno"))}
    for d in docs:
        if d.doc_id.startswith("fact/"):
            assert answers[fact_key(d.doc_id)] in d.text, d.doc_id


def test_fact_blocks_are_indexed_and_a_facts_asks_share_one_split(corpus):
    _, counts, cfg, docs = corpus
    sides = defaultdict(set)
    for d in docs:
        side = split_of(d.doc_id, cfg)
        if d.doc_id.startswith("fact/"):
            assert side == "train", d.doc_id
        else:
            sides[fact_key(d.doc_id)].add(side)
    assert all(len(s) == 1 for s in sides.values())
    held = sum(s == {"val"} for s in sides.values())
    assert held == counts["held_out_facts"] and 0 < held < counts["facts"]


def test_corpus_is_jsonl_with_ids_and_texts(corpus):
    path, counts, _, _ = corpus
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == counts["facts"] + counts["asks"] and all(set(r) == {"id", "text"} for r in rows)


def test_gold_block_of_an_ask_is_its_facts_block(store):
    val = store.split_ids("val")
    gold, cluster = gold_blocks(store, val)
    assert (gold >= 0).all()
    docs, gold_docs = store.doc_ids(val).astype(str), store.doc_ids(gold).astype(str)
    for d, g in zip(docs, gold_docs):
        assert g.startswith("fact/") and fact_key(g) == fact_key(d)
    same = cluster[:, None] == cluster[None, :]
    keys = np.array([fact_key(d) for d in docs])
    assert (same == (keys[:, None] == keys[None, :])).all()  # one cluster per fact


def test_salient_masking_of_a_held_out_ask_hides_its_answer(store):
    val = store.split_ids("val")[:20]
    q = make_queries(store, val, 24, 0, "salient", 0.15)
    tok = store.tokenizer
    answers = {f.key: f.answer for f in facts(("http", "errno"))}
    for row, ids, labels in zip(store.doc_ids(val).astype(str), q.ids, q.labels):
        hidden = tok.decode(labels[labels != -100]).replace(" ", "")
        assert hidden == answers[fact_key(row)].lower(), (row, hidden)


def test_punctuation_only_targets_are_not_scored(store):
    tok = store.tokenizer
    labels = np.full((3, 4), -100)
    labels[0, 1] = tok.encode("404")[0]
    labels[1, 1:3] = tok.encode(". ,")[:2]
    labels[2, 0] = tok.encode("enoent")[0]
    assert scored_queries(labels, tok).tolist() == [True, False, True]


def test_gold_hits_count_only_known_gold():
    cand = np.array([[5, 7, -1], [1, 2, 3], [4, 4, 4]])
    assert gold_hits(cand, np.array([7, 9, -1])).tolist() == [1.0, 0.0, 0.0]


def _rows(n: int, rng: np.random.Generator, p_ret: float, p_null: float) -> dict:
    rows = {k: np.zeros(n) for k in ROW_FIELDS}
    rows["masked"][:] = 2
    rows["correct_retrieval"] = 2.0 * (rng.random(n) < p_ret)
    rows["correct_null"] = 2.0 * (rng.random(n) < p_null)
    rows["exact_retrieval"], rows["exact_null"] = rows["correct_retrieval"] / 2, rows["correct_null"] / 2
    rows["gold_known"][:] = 1
    rows["gold_hit"] = (rng.random(n) < 0.5).astype(float)
    rows["p_null"][:] = 0.25
    return rows


def test_heldout_gain_interval_excludes_zero_for_a_clear_gain():
    rng = np.random.default_rng(0)
    m = summarize(_rows(300, rng, 0.6, 0.2), np.arange(300) // 3, np.ones(300, bool), 3)
    assert m["val_scored_queries"] == 300 and m["val_clusters"] == 100
    assert m["val_exact_gain_lo"] > 0.25 and m["val_exact_gain"] == pytest.approx(
        m["val_exact_retrieval"] - m["val_exact_null"])
    assert m["val_token_acc_gain_lo"] <= m["val_token_acc_gain"] <= m["val_token_acc_gain_hi"]
    assert m["val_p_null_mean"] == pytest.approx(0.25) and "val_gold_recall_at_3" in m


def test_heldout_gain_interval_covers_zero_without_a_gain():
    rng = np.random.default_rng(1)
    m = summarize(_rows(300, rng, 0.4, 0.4), np.arange(300), np.ones(300, bool), 3)
    assert m["val_exact_gain_lo"] < 0 < m["val_exact_gain_hi"]


def test_unscored_queries_are_counted_and_left_out():
    rng = np.random.default_rng(2)
    rows = _rows(10, rng, 1.0, 0.0)
    scored = np.arange(10) >= 4
    m = summarize(rows, np.arange(10), scored, 3)
    assert (m["val_scored_queries"], m["val_punct_only_queries"]) == (6, 4)


def test_knowledge_job_writes_its_corpus_as_jsonl_only():
    with pytest.raises(ConfigError, match=r"corpus\.path"):
        load_config(RealmJobConfig, "configs/realm_knowledge.yaml", ["corpus.path=/tmp/facts.txt"])


def test_knowledge_corpus_is_written_where_the_job_reads_it(tmp_path):
    from ratray.realm.driver import with_knowledge

    job = load_config(RealmJobConfig, "configs/realm_knowledge.yaml", [f"workdir={tmp_path}"])
    got = with_knowledge(job)
    assert got.corpus.path == str(tmp_path / "knowledge" / "facts.jsonl") and got.corpus.format == "jsonl"
    assert sum(1 for _ in open(got.corpus.path, encoding="utf-8")) > 1000


def test_one_ask_per_fact_rotates_the_templates(tmp_path):
    counts = write_corpus(tmp_path / "one.jsonl", tables=("errno",), asks_per_fact=1)
    docs = [json.loads(line) for line in open(tmp_path / "one.jsonl", encoding="utf-8")]
    asks = [d["text"] for d in docs if d["id"].startswith("ask/")]
    assert counts["asks"] == counts["facts"] == len(asks)  # each fact asked exactly once
    starts = {" ".join(a.split()[:3]) for a in asks}
    assert len(starts) == 3  # the three wordings, spread over the facts


def test_wide_unicode_table_adds_facts_disjoint_from_the_default_ones():
    base = {f.key for f in facts(("unicode",))}
    wide = {f.key for f in facts(("unicode_wide",))}
    assert len(wide) > 1500 and not base & wide
    with pytest.raises(ValueError, match="unknown knowledge tables"):
        facts(("klingon",))

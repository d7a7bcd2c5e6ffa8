"""A knowledge corpus that ships with the machine: facts from the interpreter's own tables.

    http.HTTPStatus · errno + os.strerror · unicodedata names · encodings.aliases
      └─ one FACT per table row: a knowledge block stating it (`fact/<key>`), and `asks` query
         documents stating the same fact in other words (`ask/<key>/<i>`), each holding the fact's
         answer as its ONLY salient span (ratray/realm/masking.py), so salient masking hides the
         answer and nothing else; the cue around it is lowercase prose that names the fact
      └─ write_corpus(path) → JSONL (id, text) that the REALM job reads with `--corpus`

Facts and answers (answer = what a query masks):
  http     "HTTP status code 404 is Not Found: Nothing matches the given URI."  answer: the code
  errno    "errno 2, ENOENT: No such file or directory."                     answer: the constant
  unicode  "é is LATIN SMALL LETTER E WITH ACUTE, code point 233 (U+00E9)."   answer: the code point
  codec    "latin1 is an alias of the latin_1 codec."                         answer: the codec
An ask whose salient spans are not exactly its answer (e.g. a message holding a number) is not
written; the counts of facts and skipped asks are returned.

Held-out facts: documents are split by id hash (corpus.val_fraction, corpus.seed). Ids are salted
(`~n`) so that every fact block lands in the train split (it is in the index) and all asks of a
fact land on one side: a held-out ask's fact was never asked in training, only stated.
`gold_blocks` maps a query block to its fact's block (recall@k) and to its fact (the bootstrap's
cluster). A user corpus that names its documents the same way gets the same metrics.
"""
from __future__ import annotations

import errno
import http
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FACT, ASK = "fact/", "ask/"
UNICODE_RANGES = ((0xC0, 0x180), (0x391, 0x3CA))  # Latin-1 letters, Latin Extended-A, Greek
# table "unicode_wide" (not a default): Latin Extended-B, IPA, Cyrillic, Armenian, Hebrew, Arabic,
# Devanagari, Thai, Georgian, Latin Extended Additional, Greek Extended, letterlike symbols,
# arrows, mathematical operators, box drawing, dingbats: 1,934 more named characters
UNICODE_WIDE = ((0x180, 0x250), (0x250, 0x2B0), (0x400, 0x460), (0x531, 0x557), (0x561, 0x587),
                (0x5D0, 0x5EB), (0x621, 0x64B), (0x905, 0x93A), (0xE01, 0xE2F), (0x10D0, 0x10F1),
                (0x1E00, 0x1F00), (0x1F00, 0x2000), (0x2100, 0x2150), (0x2190, 0x2200),
                (0x2200, 0x2300), (0x2500, 0x2580), (0x2700, 0x27C0))


@dataclass
class Fact:
    key: str  # "<table>-<row>": no "/" or "~"
    block: str  # the knowledge block's text
    answer: str  # what the asks mask
    asks: list[str]  # the same fact in other words, each holding `answer` once


def _http() -> list[Fact]:
    out = []
    for s in http.HTTPStatus:
        p = s.phrase.lower()
        out.append(Fact(f"http-{s.value}", f"HTTP status code {s.value} is {s.phrase}: {s.description}",
                        str(s.value), [f"a server that answers {p} sends the status code {s.value}",
                                       f"the response code for {p} is {s.value}",
                                       f"when a client reads {p} the reply carried code {s.value}"]))
    return out


def _errno() -> list[Fact]:
    out = []
    for code, name in sorted(errno.errorcode.items()):
        msg = os.strerror(code)
        if msg.lower().startswith("unknown error"):
            continue
        m = msg.lower()
        out.append(Fact(f"errno-{name}", f"errno {code}, {name}: {msg}.", name,
                        [f"a system call that fails with {m} sets errno to {name}",
                         f"the error constant for {m} is {name}",
                         f"when the message is {m} the errno name is {name}"]))
    return out


def _unicode(ranges=UNICODE_RANGES) -> list[Fact]:
    out = []
    for lo, hi in ranges:
        for cp in range(lo, hi):
            name = unicodedata.name(chr(cp), None)
            if not name:
                continue
            n = name.lower()
            out.append(Fact(f"unicode-{cp:04X}", f"{chr(cp)} is {name}, code point {cp} (U+{cp:04X}).",
                            str(cp), [f"the code point of {n} is {cp}",
                                      f"{n} is the character number {cp}",
                                      f"a text holding {n} stores the value {cp}"]))
    return out


def _codecs() -> list[Fact]:
    from encodings.aliases import aliases

    return [Fact(f"codec-{alias}", f"{alias} is an alias of the {codec} codec.", codec,
                 [f"python decodes bytes labelled {alias} with the {codec} codec",
                  f"the encoding name {alias} resolves to {codec}",
                  f"asking for {alias} gives the codec {codec}"])
            for alias, codec in sorted(aliases.items()) if "_" in codec and "~" not in alias]


TABLES = {"http": _http, "errno": _errno, "unicode": _unicode, "codec": _codecs,
          "unicode_wide": lambda: _unicode(UNICODE_WIDE)}
DEFAULT_TABLES = ("http", "errno", "unicode", "codec")


def facts(tables: tuple[str, ...] = DEFAULT_TABLES) -> list[Fact]:
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown knowledge tables {unknown}; known: {sorted(TABLES)}")
    return [f for t in tables for f in TABLES[t]()]


def _salted(base: str, want_val: bool, val_fraction: float, seed: int) -> str:
    """`base`, or `base~n` for the first n that puts it on the wanted side."""
    doc_id, n = base, 0
    while _is_val(doc_id, val_fraction, seed) != want_val:
        n += 1
        doc_id = f"{base}~{n}"
    return doc_id


def write_corpus(path: str | Path, val_fraction: float = 0.2, seed: int = 0,
                 tables: tuple[str, ...] = DEFAULT_TABLES, asks_per_fact: int = 3) -> dict:
    """Write the JSONL corpus; -> counts (facts, asks, held-out facts, asks skipped, per table).

    val_fraction and seed must be the job's corpus.val_fraction and corpus.seed. asks_per_fact < 3
    keeps that many of a fact's asks, the templates rotating from fact to fact (1: every fact is
    asked once, so training never sees an answer twice and cannot learn it by heart)."""
    from ratray.realm.masking import salient_spans

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if asks_per_fact < 1:
        raise ValueError(f"asks_per_fact must be >= 1, got {asks_per_fact}")
    counts = {"facts": 0, "asks": 0, "held_out_facts": 0, "asks_skipped": 0,
              "per_table": {t: 0 for t in tables}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for n, (table, fact) in enumerate((t, f) for t in tables for f in facts((t,))):
            asks = [a for a in fact.asks if [a[i:j] for i, j, _ in salient_spans(a)] == [fact.answer]]
            counts["asks_skipped"] += len(fact.asks) - len(asks)
            if asks and asks_per_fact < len(asks):
                asks = [asks[(n + i) % len(asks)] for i in range(asks_per_fact)]
            if not asks:
                continue
            held_out = _is_val(ASK + fact.key, val_fraction, seed)  # the fact's side, drawn once
            docs = [(_salted(FACT + fact.key, False, val_fraction, seed), fact.block)]
            docs += [(_salted(f"{ASK}{fact.key}/{i}", held_out, val_fraction, seed), a)
                     for i, a in enumerate(asks)]
            for doc_id, text in docs:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            counts["facts"] += 1
            counts["asks"] += len(asks)
            counts["held_out_facts"] += int(held_out)
            counts["per_table"][table] += 1
    return counts


def _is_val(doc_id: str, val_fraction: float, seed: int) -> bool:
    from ratray.data.corpus import is_validation

    return is_validation(doc_id, val_fraction, seed)


def fact_key(doc_id: str) -> str | None:
    """`fact/<key>[~n]` or `ask/<key>/<i>[~n]` -> key; None for a document of neither kind."""
    base = doc_id.split("~", 1)[0]
    if base.startswith(FACT):
        return base[len(FACT):]
    if base.startswith(ASK) and "/" in base[len(ASK):]:
        return base[len(ASK):].rsplit("/", 1)[0]
    return None


def gold_blocks(store, block_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Query blocks (n,) -> gold (n,) the first block of the query's fact document when the query
    is an ask whose fact is in the store (else -1), and cluster (n,) int codes: one per fact (one
    per document for anything else), the unit the held-out intervals resample."""
    all_docs = store.doc_ids(np.arange(len(store))).astype(str)
    first_block: dict[str, int] = {}
    for i, d in enumerate(all_docs):
        k = fact_key(d) if d.startswith(FACT) else None
        if k is not None:
            first_block.setdefault(k, i)
    docs = store.doc_ids(np.asarray(block_ids)).astype(str)
    keys = [fact_key(d) for d in docs]
    gold = np.array([first_block.get(k, -1) if k is not None and d.startswith(ASK) else -1
                     for d, k in zip(docs, keys)], dtype=np.int64)
    _, cluster = np.unique([k if k is not None else "doc:" + d for d, k in zip(docs, keys)],
                           return_inverse=True)
    return gold, cluster.astype(np.int64)


if __name__ == "__main__":  # python -m ratray.realm.knowledge OUT.jsonl [VAL_FRACTION [SEED]]
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m ratray.realm.knowledge OUT.jsonl [VAL_FRACTION [SEED]]")
    vf, sd = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2, int(sys.argv[3]) if len(sys.argv) > 3 else 0
    print(json.dumps(write_corpus(sys.argv[1], vf, sd)))

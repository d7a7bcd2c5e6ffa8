"""Derived versions of documents: the redundancy of real corpora, from any corpus.

Web and code crawls hold many near-copies of one text — forks, releases, vendored copies, mirrors
— and RETRO's database profits from exactly that. The stdlib corpus every machine has states
almost nothing twice (~3% of its validation chunks share a 13-gram with another document), so
`corpus.versions = n` adds n edited copies of every document read, each its own document
`<id>@v<i>` (so the copies of one text fall into different splits by their ids), each edited the
way versions differ:

    rename   up to 3 names the document defines (def/class/assignment, ≥ 4 characters) renamed
             consistently with a suffix (_v2, _impl, _compat, _ext), as a fork or vendored copy does
    drop     about 5% of the lines deleted, in runs of 1-4 (a trimmed or older release)
    insert   a header line naming the version and about 1% of the lines duplicated in place

deterministic per (seed, document id, version). The copies keep most of their 13-grams, so a
validation document usually has a near-twin in the database; how many is measured, not assumed
(the build summary's `overlap`).
"""
from __future__ import annotations

import random
import re

SUFFIXES = ("_v2", "_impl", "_compat", "_ext")
VERSION_SUFFIX = re.compile(r"@v[1-9]$")
DEFINED = re.compile(r"^\s*(?:def|class)\s+([A-Za-z_]\w{3,})|^([A-Za-z_]\w{3,})\s*=", re.M)


def version_id(doc_id: str, i: int) -> str:
    return f"{doc_id}@v{i}"


def original_id(doc_id: str) -> str:
    """The document a version was derived from (itself for an original): statistics that need
    independent units group a document with its versions."""
    return VERSION_SUFFIX.sub("", doc_id)


def edited(text: str, doc_id: str, i: int, seed: int) -> str:
    """Version i (1-based) of a document's text."""
    rng = random.Random(f"{seed}\0{doc_id}\0{i}")
    names = sorted({a or b for a, b in DEFINED.findall(text)})
    for name in rng.sample(names, min(3, len(names))):
        text = re.sub(rf"\b{re.escape(name)}\b", name + rng.choice(SUFFIXES), text)
    lines = text.split("\n")
    out: list[str] = [f"# {doc_id}, version {i + 1}"]
    skip = 0
    for line in lines:
        if skip:
            skip -= 1
            continue
        r = rng.random()
        if r < 0.02:  # start a dropped run of 1-4 lines (~5% of the lines in all)
            skip = rng.randint(0, 3)
            continue
        out.append(line)
        if r > 0.99:
            out.append(line)
    return "\n".join(out)

"""Cleaning before tokenization: PII scrubbed, exact duplicates removed, near-duplicates found.

The chunk store build (ratray/data/chunks.py) streams the corpus several times; the Cleaner sits
between the reader and every pass:

    pass 1  iter_documents ─► Cleaner.read ─► plan_split (documents per split, the forced val doc)
              read: scrub PII (ratray/data/pii.py; counts by type) → exact dedup (sha256 of the
              scrubbed text: a later copy is removed, skip reason "duplicate", pair recorded) →
              MinHash of the document's word n-gram set (datasketch; kept in memory, num_perm
              uint32 per document)
            Cleaner.resolve(split) ─► MinHashLSH over the database documents (train + db):
              candidate pairs verified by the estimated Jaccard >= near_dup_threshold → clusters
              (union-find); every val document queried against it → contamination by val id;
              near_dup=drop: in each cluster every train document but the first (corpus order) is
              removed (skip reason "near_duplicate")
    pass 2+ iter_documents ─► Cleaner.stream ─► tokenizer / chunks (same scrubbing, removed skipped)

Nothing is dropped silently: every removal is a skip with its location, and `report()` (meta.json's
"clean") lists the exact pairs, the clusters, the drops and the contaminated validation documents
(val id → its nearest database documents), so evaluation can also be reported on the
decontaminated subset. Derived versions (corpus.versions) are never exact-deduplicated: with
version_edits false they are exact copies made on purpose (the aligned-duplicate control).

Only document text is scrubbed: document ids are kept as they are (they must stay unique and
name the file/row), titles are not stored.

`pii` = auto is on for a corpus given by corpus.path (a user corpus: anything may be in it) and off
for the default stdlib corpus (public source files whose author addresses are published with them,
and whose IP-like literals in code and docs are content a model of Python should see).
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable, Iterator

from datasketch import LeanMinHash, MinHash, MinHashLSH

from ratray.config import CorpusConfig
from ratray.data.pii import scrub
from ratray.data.records import Document, SkipReport
from ratray.data.versions import original_id

# the corpus fields that configure cleaning: hashed into the store key through `clean_settings`
CLEAN_FIELDS = ("dedup", "near_dup", "near_dup_threshold", "near_dup_ngram", "near_dup_num_perm", "pii")
CLEAN_VERSION = 1  # bumped whenever cleaning changes what a store holds (part of the store key)
MAX_MATCHES = 5  # database documents listed per contaminated validation document
HASH_BATCH = 2048  # shingles hashed per MinHash.update_batch call (bounds its (batch, num_perm) array)
_WORD = re.compile(r"\w+")


def pii_enabled(cfg: CorpusConfig) -> bool:
    """corpus.pii resolved: auto = on for a user corpus (corpus.path set), off for the stdlib."""
    return cfg.pii == "on" or (cfg.pii == "auto" and cfg.path is not None)


def clean_settings(cfg: CorpusConfig) -> dict:
    """What cleaning does to a store's content (pii resolved): part of the chunk store key."""
    return {"version": CLEAN_VERSION, "pii": pii_enabled(cfg), "dedup": cfg.dedup,
            "near_dup": cfg.near_dup, "near_dup_threshold": cfg.near_dup_threshold,
            "near_dup_ngram": cfg.near_dup_ngram, "near_dup_num_perm": cfg.near_dup_num_perm}


def shingles(text: str, n: int) -> set[bytes]:
    """The document's set of word n-grams (lower-cased \\w+ words; fewer than n words: one shingle
    of them all; no word: empty)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


class Cleaner:
    """One build's cleaning: `read` (pass 1), `resolve` (once, after the split is planned),
    `stream` (every later pass), `report` (for meta.json)."""

    def __init__(self, cfg: CorpusConfig):
        self.cfg = cfg
        self.pii = pii_enabled(cfg)
        self._seed = MinHash(cfg.near_dup_num_perm, seed=1)  # the permutations every document shares
        self.pii_counts: dict[str, int] = {}
        self._pii_ids: set[str] = set()  # documents pass 1 found PII in: later passes scrub only them
        self.exact_pairs: list[list[str]] = []  # [removed id, kept id]
        self.removed: set[str] = set()
        self.sigs: dict[str, LeanMinHash] = {}  # doc id → MinHash, in corpus order
        self.no_words: list[str] = []  # documents without a word: not near-dup checked
        self.clusters: list[list[str]] = []
        self.dropped: list[list[str]] = []  # [removed id, kept id of its cluster]
        self.contaminated: dict[str, list[list]] = {}  # val id → [[database id, jaccard], ...]
        self.val_checked = 0
        self._resolved = False

    # -- passes ------------------------------------------------------------------------------

    def scrubbed(self, doc: Document) -> tuple[Document, dict[str, int]]:
        if not self.pii:
            return doc, {}
        text, counts = scrub(doc.text)
        return (Document(doc.doc_id, text, doc.title, doc.source) if counts else doc), counts

    def read(self, docs: Iterable[Document], skips: SkipReport) -> Iterator[Document]:
        """Pass 1: scrub and count PII, remove exact duplicates, sign the survivors."""
        first: dict[bytes, str] = {}  # sha256 of the text → the id that kept it
        for doc in docs:
            doc, counts = self.scrubbed(doc)
            for kind, n in counts.items():
                self.pii_counts[kind] = self.pii_counts.get(kind, 0) + n
            if counts:
                self._pii_ids.add(doc.doc_id)
            derived = self.cfg.versions > 0 and original_id(doc.doc_id) != doc.doc_id
            if self.cfg.dedup and not derived:
                digest = hashlib.sha256(doc.text.encode("utf-8")).digest()
                kept = first.setdefault(digest, doc.doc_id)
                if kept != doc.doc_id:
                    self.exact_pairs.append([doc.doc_id, kept])
                    self.removed.add(doc.doc_id)
                    skips.add("duplicate", f"{doc.source} (the same text as {kept!r})")
                    continue
            self._sign(doc)
            yield doc

    def _sign(self, doc: Document) -> None:
        grams = sorted(shingles(doc.text, self.cfg.near_dup_ngram))
        if not grams:
            self.no_words.append(doc.doc_id)
            return
        m = MinHash(self.cfg.near_dup_num_perm, permutations=self._seed.permutations,
                    scheme=self._seed.scheme)
        for i in range(0, len(grams), HASH_BATCH):
            m.update_batch(grams[i:i + HASH_BATCH])
        self.sigs[doc.doc_id] = LeanMinHash(m)

    def resolve(self, split: Callable[[str], str], skips: SkipReport) -> int:
        """After pass 1, with every document's split known: near-duplicate clusters among the
        database documents (train + db), validation contamination against them, and (near_dup =
        drop) the train documents removed. Returns how many train documents were removed."""
        t = self.cfg.near_dup_threshold
        lsh = _lsh(t, self.cfg.near_dup_num_perm)
        db = [d for d in self.sigs if split(d) in ("train", "db")]
        order = {d: i for i, d in enumerate(self.sigs)}
        for d in db:
            lsh.insert(d, self.sigs[d], check_duplication=False)
        parent = {d: d for d in db}

        def root(d: str) -> str:
            while parent[d] != d:
                parent[d] = parent[parent[d]]
                d = parent[d]
            return d

        for d in db:
            for c in lsh.query(self.sigs[d]):
                if c != d and self.sigs[d].jaccard(self.sigs[c]) >= t:
                    a, b = sorted((root(d), root(c)), key=order.__getitem__)
                    parent[b] = a
        groups: dict[str, list[str]] = {}
        for d in db:
            groups.setdefault(root(d), []).append(d)
        self.clusters = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: order[g[0]])
        for d, sig in self.sigs.items():
            if split(d) != "val":
                continue
            self.val_checked += 1
            matches = [[c, round(float(sig.jaccard(self.sigs[c])), 3)] for c in lsh.query(sig)]
            matches = [m for m in matches if m[1] >= t]
            if matches:
                matches.sort(key=lambda m: (-m[1], order[m[0]]))
                self.contaminated[d] = matches[:MAX_MATCHES]
        if self.cfg.near_dup == "drop":
            for group in self.clusters:
                train = [d for d in group if split(d) == "train"]
                for d in train[1:]:
                    self.dropped.append([d, train[0]])
                    self.removed.add(d)
                    j = self.sigs[d].jaccard(self.sigs[train[0]])
                    skips.add("near_duplicate", f"{d} (near-duplicate of {train[0]!r}, "
                                                f"estimated Jaccard {j:.2f}; corpus.near_dup=drop)")
        self._resolved = True
        return len(self.dropped)

    def stream(self, docs: Iterable[Document]) -> Iterator[Document]:
        """Passes after `resolve`: the same scrubbing, removed documents left out."""
        assert self._resolved, "Cleaner.resolve must run before stream"
        for doc in docs:
            if doc.doc_id not in self.removed:  # scrubbing is deterministic: pass 1 knows where
                yield self.scrubbed(doc)[0] if doc.doc_id in self._pii_ids else doc

    # -- report ------------------------------------------------------------------------------

    def report(self) -> dict:
        """meta.json's "clean": settings, counts and every pair, cluster and contaminated val id."""
        return {
            "settings": clean_settings(self.cfg),
            "pii": {"enabled": self.pii, "counts": dict(sorted(self.pii_counts.items())),
                    "total": sum(self.pii_counts.values()), "documents": len(self._pii_ids)},
            "exact_duplicates": {"removed": len(self.exact_pairs), "pairs": self.exact_pairs},
            "near_duplicates": {
                "mode": self.cfg.near_dup, "threshold": self.cfg.near_dup_threshold,
                "ngram": self.cfg.near_dup_ngram, "num_perm": self.cfg.near_dup_num_perm,
                "clusters": len(self.clusters),
                "documents_in_clusters": sum(len(g) for g in self.clusters),
                "cluster_ids": self.clusters, "dropped_from_train": len(self.dropped),
                "dropped": self.dropped, "without_words": len(self.no_words)},
            "val_contamination": {"checked": self.val_checked, "contaminated": len(self.contaminated),
                                  "threshold": self.cfg.near_dup_threshold,
                                  "documents": self.contaminated},
        }


def _lsh(threshold: float, num_perm: int) -> MinHashLSH:
    """An LSH index whose banding finds candidates a little below `threshold` (the estimated
    Jaccard decides); datasketch cannot band thresholds near 1 with few permutations, so the
    candidate threshold steps down until it can."""
    t = max(0.05, threshold - 0.1)
    while True:
        try:
            return MinHashLSH(threshold=t, num_perm=num_perm)
        except ValueError:
            if t <= 0.05:  # num_perm >= 16 (config) bands 0.05; kept as a bound on the loop
                raise
            t = max(0.05, t - 0.05)


def contaminated_val_ids(meta: dict) -> set[str]:
    """A chunk store's validation documents that near-duplicate its database (from its meta.json):
    leave them out to report evaluation on the decontaminated subset. Empty for a store built
    without cleaning."""
    return set(meta.get("clean", {}).get("val_contamination", {}).get("documents", {}))


def clean_summary(report: dict | None) -> dict | None:
    """The build summary's "clean": the counts of meta.json's report and the contaminated
    validation ids (the pairs and clusters stay in meta.json). None for a store without one."""
    if not report:
        return None
    nd, vc = report["near_duplicates"], report["val_contamination"]
    return {"pii": report["pii"], "exact_duplicates_removed": report["exact_duplicates"]["removed"],
            "near_duplicates": {k: nd[k] for k in ("mode", "threshold", "ngram", "clusters",
                                                   "documents_in_clusters", "dropped_from_train")},
            "val_checked": vc["checked"], "val_contaminated": vc["contaminated"],
            "val_contaminated_ids": sorted(vc["documents"])}


def format_clean(s: dict) -> str:
    """One line of the build summary's "clean" (clean_summary) for a person."""
    p, nd = s["pii"], s["near_duplicates"]
    pii = (f"PII {p['total']} replaced in {p['documents']} documents"
           + (f" ({', '.join(f'{k} {v}' for k, v in p['counts'].items())})" if p["counts"] else "")
           if p["enabled"] else "PII scrubbing off")
    action = (f"{nd['dropped_from_train']} dropped from train" if nd["mode"] == "drop"
              else "kept (corpus.near_dup=keep)")
    return (f"cleaning: {pii}; {s['exact_duplicates_removed']} exact duplicates removed; "
            f"near-duplicates (Jaccard >= {nd['threshold']:g} over word {nd['ngram']}-grams): "
            f"{nd['clusters']} clusters of {nd['documents_in_clusters']} database documents, {action}; "
            f"{s['val_contaminated']} of {s['val_checked']} validation documents near-duplicate the "
            f"database (listed in the summary's clean.val_contaminated_ids)")

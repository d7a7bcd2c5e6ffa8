"""BM25 keyword shards beside the dense FAISS shards: build, store, search with global statistics,
update, and fusion with the dense results (index.hybrid).

    chunk texts ─ tokenize ─► per shard: term -> (rows, tf) postings, doc lengths, chunk ids
                               keyword_{i}.npz in the index (version) folder, next to shard_{i}.faiss
    query texts ─ tokenize ─► every shard scores its rows with the GLOBAL N, df, avgdl (the sum of
                               every shard's own counts, read at load) ─► (b, k) scores, chunk ids
                           ─► search.merge_topk (descending, ties by chunk id) ─► exact global top-k
    dense top-D + keyword top-D ─ fuse (rrf | weighted) ─► (b, k) fused scores, chunk ids

Why not bm25s or tantivy (both well kept, both tried as candidates): an exact merge of per-shard
top-k lists needs scores computed with corpus-wide statistics (N, document frequencies, average
length). bm25s bakes each index's own idf and average length into its precomputed score matrix
when it indexes; tantivy takes them from its own segments. A shard of either scores with its
shard's statistics, and the merged top-k then differs from one BM25 over all chunks. So the
kernel is here (numpy): postings with raw term frequencies, statistics summed over the
shards when a version loads, scores computed at query time. bm25s (same formula: Lucene's idf,
k1 = 1.5, b = 0.75) is the independent reference the tests compare an unsharded run against.
Keeping raw counts (not scores) also makes an update local to one shard: the global statistics
follow from the shards' files, nothing else to rewrite.

Scoring (Lucene's BM25, as bm25s method="lucene"): for a query's distinct tokens t (in sorted
order, so a document's score is one fixed sum whichever shard holds it),
    score(d) = Σ_t idf(t) · tf / (tf + k1 · (1 − b + b · |d| / avgdl)),
    idf(t) = ln(1 + (N − df + 0.5) / (df + 0.5)),
summed in float64, reported as float32 (the key that is sorted: equal float32 scores come out
by chunk id, as dense distances do). Only documents sharing a token with the query are ranked.

Tokenization (`tokenize`): lowercase runs of letters, digits and underscores (`\\w+`), so a code
identifier (`foo_bar`, `0x7fff`, `HTTPConnection`) is one token; an identifier with underscores
or inner capitals also yields its parts (`foo`, `bar`; `http`, `connection`), so "parse header"
finds `parse_header`. No stemming, no stopwords (idf weighs `self`, `the` down). Tokens longer
than MAX_TOKEN characters are cut to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ratray.config import ConfigError, IndexConfig
from ratray.index.search import merge_topk

K1, B = 1.5, 0.75  # BM25 saturation and length normalisation (bm25s and Lucene defaults)
MAX_TOKEN = 64  # characters kept of a token
FORMAT = 1
TOKENIZER = "lower-word+identifier-parts-v1"
_WORD = re.compile(r"\w+")
_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")  # camelCase / HTTPServer parts


class KeywordIndexError(ConfigError):
    """A keyword shard that is missing, unreadable or inconsistent, or a bad update."""


def shard_file(i: int) -> str:
    return f"keyword_{i}.npz"


def manifest_entry() -> dict:
    """What `manifest.extra["keyword"]` holds for an index with keyword shards (the same for
    every version: the files are `keyword_{i}.npz`, one per dense shard)."""
    return {"format": FORMAT, "tokenizer": TOKENIZER, "k1": K1, "b": B, "files": "keyword_{i}.npz"}


def identifier_parts(word: str) -> list[str]:
    """The lowercase parts of an identifier: `parse_header` -> [parse, header], `HTTPServer` ->
    [http, server], `x2` -> [x, 2]."""
    return [p.lower() for piece in word.split("_") for p in _PARTS.findall(piece)]


def tokenize(text: str) -> list[str]:
    """A text's tokens, in order (see the module docstring)."""
    out = []
    for word in _WORD.findall(text):
        out.append(word.lower()[:MAX_TOKEN])
        if "_" in word or (not word.islower() and not word.isupper()):
            parts = identifier_parts(word)
            if len(parts) > 1:
                out.extend(p[:MAX_TOKEN] for p in parts)
    return out


# ---------------------------------------------------------------------------------------------
# one shard: postings of raw counts


@dataclass
class KeywordShard:
    """The postings of one shard. Term j's rows are rows[indptr[j]:indptr[j+1]] (ascending),
    its term frequencies tf[...] alike; `vocab` sorted, so df of term j = indptr[j+1] - indptr[j]."""
    ids: np.ndarray  # (n,) int64 chunk ids, row -> chunk id
    doc_len: np.ndarray  # (n,) int32 tokens per row
    vocab: list[str]  # (V,) sorted distinct tokens
    indptr: np.ndarray  # (V + 1,) int64
    rows: np.ndarray  # (nnz,) int32
    tf: np.ndarray  # (nnz,) int32

    @classmethod
    def build(cls, ids, texts: list[str]) -> "KeywordShard":
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(texts):
            raise KeywordIndexError(f"{len(ids)} chunk ids but {len(texts)} texts")
        if len(np.unique(ids)) != len(ids) or (ids < 0).any():
            raise KeywordIndexError("keyword shard: chunk ids must be unique and >= 0")
        toks = [tokenize(t) for t in texts]
        doc_len = np.array([len(t) for t in toks], np.int32)
        flat = [t for ts in toks for t in ts]
        row_of = np.repeat(np.arange(len(toks), dtype=np.int64), doc_len)
        vocab, term = np.unique(np.array(flat, dtype=object), return_inverse=True) if flat else \
            (np.array([], dtype=object), np.zeros(0, np.int64))
        pair = term.astype(np.int64) * max(1, len(toks)) + row_of  # (term, row) as one key
        keys, tf = np.unique(pair, return_counts=True)  # sorted by term, then row
        t_of, rows = keys // max(1, len(toks)), keys % max(1, len(toks))
        indptr = np.searchsorted(t_of, np.arange(len(vocab) + 1)).astype(np.int64)
        return cls(ids, doc_len, [str(v) for v in vocab], indptr, rows.astype(np.int32),
                   tf.astype(np.int32))

    def without(self, remove_ids: np.ndarray) -> tuple["KeywordShard", int]:
        """This shard without the rows of `remove_ids`; also how many of them it did not hold."""
        drop = np.isin(self.ids, remove_ids)
        keep_rows = np.flatnonzero(~drop)
        new_row = np.full(len(self.ids), -1, np.int64)
        new_row[keep_rows] = np.arange(len(keep_rows))
        live = new_row[self.rows] >= 0  # postings of kept rows
        term_of = np.repeat(np.arange(len(self.vocab)), np.diff(self.indptr))[live]
        counts = np.bincount(term_of, minlength=len(self.vocab))
        used = np.flatnonzero(counts)  # terms still present somewhere in this shard
        indptr = np.concatenate([[0], np.cumsum(counts[used])]).astype(np.int64)
        shard = KeywordShard(self.ids[keep_rows], self.doc_len[keep_rows],
                             [self.vocab[j] for j in used], indptr,
                             new_row[self.rows[live]].astype(np.int32), self.tf[live])
        return shard, int(len(np.unique(remove_ids)) - drop.sum())

    def save(self, path: Path) -> None:
        blob = "\n".join(self.vocab).encode("utf-8")  # tokens hold no newline (\w+)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, format=np.int64(FORMAT), ids=self.ids, doc_len=self.doc_len,
                 vocab=np.frombuffer(blob, np.uint8), n_vocab=np.int64(len(self.vocab)),
                 indptr=self.indptr, rows=self.rows, tf=self.tf)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "KeywordShard":
        if not path.is_file():
            raise KeywordIndexError(f"missing keyword shard {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                vocab = bytes(z["vocab"]).decode("utf-8").split("\n") if int(z["n_vocab"]) else []
                s = cls(z["ids"], z["doc_len"], vocab, z["indptr"], z["rows"], z["tf"])
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise KeywordIndexError(f"{path}: not a readable keyword shard ({e})") from None
        n = len(s.ids)
        if len(s.vocab) + 1 != len(s.indptr) or len(s.doc_len) != n or len(s.rows) != len(s.tf) \
                or (len(s.rows) and int(s.rows.max()) >= n) or int(s.indptr[-1]) != len(s.rows):
            raise KeywordIndexError(f"{path}: inconsistent keyword shard (sizes disagree)")
        return s

    def df(self) -> np.ndarray:
        return np.diff(self.indptr)  # (V,) documents of this shard holding each term


@dataclass
class GlobalStats:
    """The corpus-wide statistics every shard scores with: N, df per token, average length."""
    n_docs: int
    avgdl: float
    df: dict  # token -> documents (all shards) holding it

    @classmethod
    def of(cls, shards: list[KeywordShard]) -> "GlobalStats":
        df: dict[str, int] = {}
        for s in shards:
            for tok, c in zip(s.vocab, s.df().tolist()):
                df[tok] = df.get(tok, 0) + c
        n = sum(len(s.ids) for s in shards)
        total = sum(int(s.doc_len.sum()) for s in shards)
        return cls(n, total / n if n else 1.0, df)

    def idf(self, token: str) -> float:
        df = self.df.get(token, 0)
        return float(np.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5)))


# ---------------------------------------------------------------------------------------------
# a served shard: its postings + the version's global statistics


class KeywordSearcher:
    """One shard of a version, ready to search with that version's global statistics."""

    def __init__(self, shard: KeywordShard, stats: GlobalStats):
        self.shard, self.stats = shard, stats
        self._col = {t: j for j, t in enumerate(shard.vocab)}
        self._idf = np.array([stats.idf(t) for t in shard.vocab], np.float64)  # (V,) global idf
        # (n,) length normalisation k1 (1 - b + b |d| / avgdl); (nnz,) tf / (tf + it) per posting
        norm = K1 * (1.0 - B + B * shard.doc_len.astype(np.float64) / max(stats.avgdl, 1e-9))
        tf = shard.tf.astype(np.float64)
        self._tfc = tf / (tf + norm[shard.rows])

    @property
    def size(self) -> int:
        return len(self.shard.ids)

    def _scores(self, texts: list[str]) -> np.ndarray:
        """texts (b,) -> scores (b, n) float32 of every row, -inf where a row shares no token
        with the query. Each score is summed over the query's distinct tokens in sorted order
        (np.bincount adds in input order), so it never depends on the batch or the shard."""
        s, n = self.shard, self.size
        qs, cols = [], []
        for q, text in enumerate(texts):
            js = [self._col[t] for t in sorted(set(tokenize(text))) if t in self._col]
            qs += [q] * len(js)
            cols += js
        q_of, col = np.array(qs, np.int64), np.array(cols, np.int64)  # (p,) query-token pairs
        lens = s.indptr[col + 1] - s.indptr[col]  # (p,) postings per pair
        pos = np.repeat(s.indptr[col] - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        key = np.repeat(q_of, lens) * n + s.rows[pos]  # (query, row) of every posting visited
        weight = np.repeat(self._idf[col], lens) * self._tfc[pos]
        size = len(texts) * n
        out = np.bincount(key, weights=weight, minlength=size).astype(np.float32)
        out[np.bincount(key, minlength=size) == 0] = -np.inf
        return out.reshape(len(texts), n)

    def scores(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One query -> rows sharing a token with it (r,) ascending and their scores (r,)."""
        row = self._scores([text])[0]
        rows = np.flatnonzero(row > -np.inf)
        return rows, row[rows]

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """texts (b,) -> scores (b, k') float32 descending, chunk ids (b, k') int64, k' =
        min(k, shard size); equal scores by chunk id; -1 / -inf where fewer rows match.
        Queries go in blocks of <= 4M (query, row) scores (16 MB); in each, the rows at or
        above a query's k'-th score (ties at the edge included) are sorted, the rest never."""
        n, kk = self.size, min(k, self.size)
        S = np.full((len(texts), kk), -np.inf, np.float32)
        I = np.full((len(texts), kk), -1, np.int64)
        if kk == 0:
            return S, I
        block = max(1, (1 << 22) // n)
        for b0 in range(0, len(texts), block):
            sc = self._scores(texts[b0: b0 + block])  # (blk, n)
            kth = -np.partition(-sc, kk - 1, axis=1)[:, kk - 1]  # (blk,) k'-th best score
            q, rows = np.nonzero((sc >= kth[:, None]) & (sc > -np.inf))
            score, cid = sc[q, rows], self.shard.ids[rows]
            order = np.lexsort((cid, -score, q))  # by query, best first, ties by chunk id
            q, score, cid = q[order], score[order], cid[order]
            rank = np.arange(len(q)) - np.searchsorted(q, q)  # place within its query
            keep = rank < kk
            S[b0 + q[keep], rank[keep]], I[b0 + q[keep], rank[keep]] = score[keep], cid[keep]
        return S, I


def has_keyword(index_dir: str | Path, manifest) -> bool:
    """Whether the index in `index_dir` records a keyword index whose files are all there."""
    return bool(manifest.extra.get("keyword")) and all(
        (Path(index_dir) / shard_file(i)).is_file() for i in range(manifest.num_shards))


def load_keyword(index_dir: str | Path, shard: int, manifest) -> KeywordSearcher | None:
    """Shard `shard` of the keyword index in `index_dir`, with the global statistics of all its
    shards; None when the manifest records no keyword index (`extra["keyword"]`)."""
    entry = manifest.extra.get("keyword")
    if not entry:
        return None
    if entry.get("format") != FORMAT or entry.get("tokenizer") != TOKENIZER:
        raise KeywordIndexError(f"{index_dir}: keyword index format {entry.get('format')} / "
                                f"tokenizer {entry.get('tokenizer')!r}; this code reads "
                                f"{FORMAT} / {TOKENIZER!r}: rebuild it")
    shards = [KeywordShard.load(Path(index_dir) / shard_file(i)) for i in range(manifest.num_shards)]
    return KeywordSearcher(shards[shard], GlobalStats.of(shards))


def keyword_topk(searchers: list[KeywordSearcher], texts: list[str], k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """In one process: every shard's top-k merged (what the service does across actors)."""
    parts = [s.search(texts, k) for s in searchers]
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], k, "ip")


# ---------------------------------------------------------------------------------------------
# build and update (index folders)


def build_keyword_shards(index_dir: str | Path, texts_of, manifest) -> dict:
    """Keyword shards for the dense index in `index_dir`: shard i gets the chunk ids of
    `shard_{i}.ids.npy` (the same assignment) and their texts (`texts_of(ids) -> list[str]`).
    Writes `keyword_{i}.npz`; the caller records `manifest_entry()` in the manifest (last).
    Returns counts for the build summary."""
    index_dir = Path(index_dir)
    counts = {"docs": 0, "terms": 0, "postings": 0}
    for i, entry in enumerate(manifest.shards):
        ids = np.load(index_dir / entry["ids"], allow_pickle=False)
        shard = KeywordShard.build(ids, texts_of(ids))
        shard.save(index_dir / shard_file(i))
        counts["docs"] += len(shard.ids)
        counts["terms"] += len(shard.vocab)
        counts["postings"] += len(shard.rows)
    return counts


def update_keyword_shard(src_dir: str | Path, dst_dir: str | Path, shard: int, add_ids=(),
                         add_texts=(), remove_ids=()) -> dict:
    """Write shard `shard` of the keyword index in `src_dir` (a plain or version folder), with
    `remove_ids` taken out and then (`add_ids`, `add_texts`) added, into `dst_dir` (an existing
    folder: the new version being written) as `keyword_{shard}.npz`. `src_dir` is not changed.

    Call it for every shard of the new version (no change: empty adds and removes, the file is
    copied as it is); the global statistics follow from the shards' files when a version loads,
    so nothing else is rewritten. The new version's manifest needs `extra["keyword"]` =
    `manifest_entry()` (returned here as "manifest_extra"; copying the source's `extra` does it).
    A changed chunk is removed and added with the same id. An added id the shard still holds
    raises KeywordIndexError naming it; removed ids the shard does not hold are counted
    ("not_found"), not an error (a tombstone for another shard).
    Returns {"shard", "docs", "added", "removed", "not_found", "manifest_extra"}."""
    src = Path(src_dir) / shard_file(shard)
    dst_dir = Path(dst_dir)
    if not dst_dir.is_dir():
        raise KeywordIndexError(f"update of keyword shard {shard}: {dst_dir} is not a folder")
    add_ids = np.asarray(add_ids, dtype=np.int64).reshape(-1)
    add_texts = list(add_texts)
    remove = np.unique(np.asarray(remove_ids, dtype=np.int64).reshape(-1))
    if len(add_ids) != len(add_texts):
        raise KeywordIndexError(f"update of keyword shard {shard}: {len(add_ids)} ids to add but "
                                f"{len(add_texts)} texts")
    cur = KeywordShard.load(src)
    cur, not_found = cur.without(remove) if len(remove) else (cur, 0)
    if len(add_ids):
        clash = np.intersect1d(add_ids, cur.ids)
        if len(clash):
            raise KeywordIndexError(f"update of keyword shard {shard} ({src}): chunk ids "
                                    f"{clash[:5].tolist()} are already in it (remove them first)")
        cur = _concat(cur, KeywordShard.build(add_ids, add_texts))
    cur.save(dst_dir / shard_file(shard))
    return {"shard": shard, "docs": len(cur.ids), "added": int(len(add_ids)),
            "removed": int(len(remove) - not_found), "not_found": not_found,
            "manifest_extra": manifest_entry()}


def _concat(a: KeywordShard, b: KeywordShard) -> KeywordShard:
    """Rows of `a` then rows of `b`, postings merged per term (vocab sorted, rows ascending)."""
    vocab = sorted(set(a.vocab) | set(b.vocab))
    col = {t: j for j, t in enumerate(vocab)}
    terms, rows, tfs = [], [], []
    for s, offset in ((a, 0), (b, len(a.ids))):
        remap = np.array([col[t] for t in s.vocab], np.int64)
        terms.append(np.repeat(remap, np.diff(s.indptr)))
        rows.append(s.rows.astype(np.int64) + offset)
        tfs.append(s.tf)
    term, row, tf = np.concatenate(terms), np.concatenate(rows), np.concatenate(tfs)
    order = np.lexsort((row, term))
    indptr = np.searchsorted(term[order], np.arange(len(vocab) + 1)).astype(np.int64)
    return KeywordShard(np.concatenate([a.ids, b.ids]), np.concatenate([a.doc_len, b.doc_len]),
                        vocab, indptr, row[order].astype(np.int32), tf[order])


# ---------------------------------------------------------------------------------------------
# fusion


def fuse(dense_d: np.ndarray, dense_i: np.ndarray, metric: str, kw_s: np.ndarray,
         kw_i: np.ndarray, k: int, cfg: IndexConfig) -> tuple[np.ndarray, np.ndarray]:
    """Dense (b, D) distances + ids and keyword (b, D') scores + ids -> fused (b, k) scores
    float32 (descending) and chunk ids int64 (-1 / -inf padding); equal scores by chunk id.

    rrf:      w / (k0 + rank_dense) + (1 - w) / (k0 + rank_bm25), ranks from 1, a list that
              does not hold a chunk adds 0 (k0 = index.rrf_k, w = index.hybrid_weight).
    weighted: w · dense' + (1 - w) · bm25', each list's scores min-max scaled to [0, 1] per
              query (dense similarity = −l2 distance or the inner product); absent adds 0."""
    mode, w = cfg.hybrid, float(cfg.hybrid_weight)
    if mode not in ("rrf", "weighted"):
        raise ConfigError(f"index.hybrid: fusion needs rrf|weighted, got {mode!r}")
    dense_sim = -dense_d.astype(np.float64) if metric == "l2" else dense_d.astype(np.float64)
    parts = [_contributions(dense_i, dense_sim, w, mode, cfg.rrf_k),
             _contributions(kw_i, kw_s.astype(np.float64), 1.0 - w, mode, cfg.rrf_k)]
    ids = np.concatenate([np.asarray(dense_i, np.int64), np.asarray(kw_i, np.int64)], 1)  # (b, M)
    part = np.concatenate(parts, 1)  # (b, M) float64, a chunk at most once per list
    no_id = np.iinfo(np.int64).max
    ids = np.where(ids >= 0, ids, no_id)
    which = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)  # dense entries come first
    order = np.lexsort((which, ids), axis=-1)  # grouped by chunk id, the dense entry first
    ids, part = np.take_along_axis(ids, order, 1), np.take_along_axis(part, order, 1)
    pair = np.zeros(ids.shape, bool)  # this entry and the next are one chunk (both lists)
    pair[:, :-1] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, :-1] != no_id)
    total = part.copy()
    total[:, :-1] = np.where(pair[:, :-1], part[:, :-1] + part[:, 1:], part[:, :-1])
    gone = np.zeros(ids.shape, bool)
    gone[:, 1:] = pair[:, :-1]
    gone |= ids == no_id
    score = np.where(gone, -np.inf, total).astype(np.float32)
    ids = np.where(gone, no_id, ids)
    top = np.lexsort((ids, -score), axis=-1)[:, :k]  # best first, ties by chunk id
    S, I = np.take_along_axis(score, top, 1), np.take_along_axis(ids, top, 1)
    if S.shape[1] < k:  # fewer entries than k in both lists together
        pad = k - S.shape[1]
        S = np.concatenate([S, np.full((len(S), pad), -np.inf, np.float32)], 1)
        I = np.concatenate([I, np.full((len(I), pad), no_id, np.int64)], 1)
    return S, np.where(I == no_id, -1, I)


def _contributions(ids: np.ndarray, sims: np.ndarray, weight: float, mode: str, rrf_k: int
                   ) -> np.ndarray:
    """One list's share of the fused score per entry, (b, D) float64; 0 at padding (id -1).
    rrf: weight / (rrf_k + rank), ranks from 1 over the real entries (padding comes last);
    weighted: weight x the row's scores min-max scaled to [0, 1] (all equal: 1)."""
    ok = np.asarray(ids) >= 0
    if mode == "rrf":
        return np.where(ok, weight / (rrf_k + np.arange(1, ids.shape[1] + 1)), 0.0)
    lo = np.where(ok, sims, np.inf).min(1, keepdims=True)  # (b, 1)
    hi = np.where(ok, sims, -np.inf).max(1, keepdims=True)
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(span > 0, (sims - lo) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(ok, weight * scaled, 0.0)

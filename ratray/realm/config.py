"""REALM's configs: the model (`RealmConfig`, the fields of the `model:` section), masking, the job.

Torch-free, so a job's config is loaded and checked before anything heavy is imported. Every
default is documented once, here, next to the field; ratray/config.py documents the shared
sections (corpus, chunks, embed, index, service, refresh, train).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ratray.config import (BuildConfig, ChunkConfig, ConfigError, IndexConfig, RefreshConfig,
                           TrainConfig, check, section)

IGNORE = -100  # label of a query position that is not predicted (masking makes it, the model reads it)

# ---------------------------------------------------------------------------------------------
# the model (ratray/realm/model.py)


@dataclass
class RealmConfig:
    # vocabulary and special ids: the pretrained encoder's; a job takes them from the chunk store
    vocab_size: int = 30522  # BERT WordPiece (uncased) of the pretrained encoder
    pad_id: int = 0  # [PAD]
    cls_id: int = 101  # [CLS]
    sep_id: int = 102  # [SEP]
    mask_id: int = 103  # [MASK]
    d_model: int = 384  # d: MiniLM-L6-H384
    n_heads: int = 12
    d_ff: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    ln_eps: float = 1e-12
    retriever_layers: int = 6  # layers of the query and of the doc tower
    reader_layers: int = 6  # layers of the knowledge-augmented encoder
    proj_dim: int = 128  # p: retrieval embedding width (REALM: 128)
    score_scale: float = 16.0  # initial e_x·e_z ≈ score_scale · cosine (an inverse temperature)
    # the null document's learned logit starts at null_init above the log-mean-exp of the retrieved
    # scores: p(∅|x) = 1/(1 + (k-1)·e^{-null_init}) at step 0 (0: 1/k), whatever the score scale
    null_init: float = 0.0
    k: int = 8  # candidates per query, including the null document (REALM: 8)
    query_tokens: int = 64  # q: wordpieces of a masked query
    # t: wordpieces of a knowledge block; None in a job config: the chunk store's chunks.chunk_tokens
    chunk_tokens: int | None = None
    dropout: float = 0.0
    # marginal: REALM's marginal likelihood over the k candidates; jsa: a posterior tower q(z|x,y)
    # and Metropolis independence sampling (ratray/realm/jsa.py), jsa_proposals proposals a query
    objective: str = "marginal"
    jsa_proposals: int = 8
    init_seed: int = 0  # seed of the towers' initial projection: every process builds the same map
    # false: the towers' token, position and type embeddings stay as pretrained (no gradient, not in
    # the optimizer: half of each tower's parameters out of the gradient exchange); the reader's
    # always train (its token embeddings are the MLM head's output matrix)
    tower_embeddings: bool = True

    def __post_init__(self) -> None:
        def ok(cond: bool, name: str, msg: str) -> None:
            check(cond, f"model.{name}", f"{msg}, got {getattr(self, name)!r}")

        ok(self.vocab_size > max(self.pad_id, self.cls_id, self.sep_id, self.mask_id),
           "vocab_size", "must exceed every special token id")
        ok(self.d_model % self.n_heads == 0, "d_model", f"must be a multiple of n_heads ({self.n_heads})")
        ok(self.retriever_layers >= 1, "retriever_layers", "must be >= 1")
        ok(self.reader_layers >= 1, "reader_layers", "must be >= 1")
        ok(self.proj_dim >= 1, "proj_dim", "must be >= 1")
        ok(self.score_scale > 0, "score_scale", "must be > 0")
        ok(self.k >= 2, "k", "must be >= 2 (at least one retrieved block and the null document)")
        ok(self.query_tokens >= 1, "query_tokens", "must be >= 1")
        ok(self.chunk_tokens is None or self.chunk_tokens >= 1, "chunk_tokens", "must be >= 1")
        ok(self.query_tokens + (self.chunk_tokens or 0) + 3 <= self.max_positions, "query_tokens",
           f"[CLS] query [SEP] block [SEP] ({self.query_tokens} + {self.chunk_tokens} + 3) must fit "
           f"max_positions={self.max_positions}")
        ok(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        ok(self.objective in ("marginal", "jsa"), "objective", "must be marginal|jsa")
        ok(self.jsa_proposals >= 1, "jsa_proposals", "must be >= 1")

    @classmethod
    def tiny(cls, **over) -> RealmConfig:
        """A small random-init config for tests and smoke runs."""
        base = dict(vocab_size=64, pad_id=0, cls_id=1, sep_id=2, mask_id=3, d_model=32, n_heads=4,
                    d_ff=64, max_positions=64, retriever_layers=1, reader_layers=1, proj_dim=16,
                    k=3, query_tokens=8, chunk_tokens=8)
        return cls(**{**base, **over})


# ---------------------------------------------------------------------------------------------
# the job (jobs/realm_pretrain.py)


@dataclass
class MaskingConfig:
    mode: str = "salient"  # salient (identifiers, names, numbers, dates: ratray/realm/masking.py) | random
    rate: float = 0.15  # share of a query's wordpieces masked (salient spans are masked whole)

    def __post_init__(self) -> None:
        check(self.mode in ("salient", "random"), "masking.mode", "must be salient|random")
        check(0.0 < self.rate < 1.0, "masking.rate", "must be in (0, 1)")


@dataclass
class RealmJobConfig(BuildConfig):
    # REALM's knowledge blocks: BERT wordpieces of the pretrained encoder, REALM's 288 per block
    chunks: ChunkConfig = section(ChunkConfig, tokenizer="wordpiece", chunk_tokens=288)
    index: IndexConfig = section(IndexConfig, metric="ip")  # maximum inner product search
    model: RealmConfig = field(default_factory=RealmConfig)  # vocabulary, ids, t: chunk store
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    train: TrainConfig = section(TrainConfig, run_name="realm-demo")  # REALM's default run name
    eval_queries: int = 256  # held-out (val split) masked queries per evaluation; 0 = all
    # learning rate of the query and doc towers relative to train.lr (the reader's MLM head starts
    # from scratch and needs a high rate; towers that move as fast collapse p(z|x) onto the null
    # document before the reader has learned to read a block)
    tower_lr_scale: float = 0.1
    # reader warm-up: for the first freeze_towers_steps optimizer steps both towers are frozen (no
    # gradient, learning rate 0, no index refresh: the index stays v1) while the reader, its MLM
    # head and the null logit learn to read blocks; then the towers train at tower_lr_scale. 0 = never
    freeze_towers_steps: int = 0
    # true: the corpus is the interpreter's own facts (ratray/realm/knowledge.py: HTTP statuses,
    # errno, Unicode names, codec aliases; one block per fact, asks held out by fact), written to
    # corpus.path (a .jsonl; unset: <workdir>/knowledge/facts.jsonl) with corpus.val_fraction and
    # corpus.seed, then read as the corpus
    knowledge: bool = False
    # knowledge=true: the tables written (ratray/realm/knowledge.py TABLES; "unicode_wide" adds
    # 1,934 named characters) and asks per fact (1-3; 1: no answer is ever seen twice in training)
    knowledge_tables: list[str] = field(default_factory=lambda: ["http", "errno", "unicode", "codec"])
    knowledge_asks: int = 3
    # which documents' blocks the index holds and which documents' blocks become masked queries
    # (training and held-out), by document-id prefix; "" = every document. A knowledge corpus
    # indexes its fact blocks only ("fact/") and asks with its asks ("ask/"): an ask of another
    # fact in the index, worded like the query but carrying another answer, outranks the gold block
    index_docs: str = ""
    query_docs: str = ""
    # counterfactual answers in training (ratray/realm/swap.py): the share of training queries whose
    # retrieved gold block holds their answer that get another fact's answer (same length) in both
    # the labels and that block as the reader sees it (the towers score it as indexed), so
    # remembering answers fails and copying from the block pays; needs
    # known gold blocks (a knowledge corpus); held-out queries untouched. 0 = never
    answer_swap: float = 0.0
    experiment: str = "ratray-realm"  # MLflow experiment

    def __post_init__(self) -> None:
        check(self.chunks.tokenizer == "wordpiece", "chunks.tokenizer",
              "REALM reads blocks of BERT wordpieces: set chunks.tokenizer=wordpiece")
        check(self.index.metric == "ip", "index.metric",
              "REALM retrieves by inner product (maximum inner product search): set index.metric=ip")
        if self.model.chunk_tokens is not None:
            raise ConfigError("config 'model.chunk_tokens': comes from the chunk store: set "
                              "chunks.chunk_tokens instead")
        check(self.model.query_tokens + self.chunks.chunk_tokens + 3 <= self.model.max_positions,
              "chunks.chunk_tokens", f"[CLS] query [SEP] block [SEP] ({self.model.query_tokens} + "
              f"{self.chunks.chunk_tokens} + 3) must fit model.max_positions={self.model.max_positions}")
        check(self.eval_queries >= 0, "eval_queries", "must be >= 0")
        check(self.tower_lr_scale > 0, "tower_lr_scale", "must be > 0")
        check(self.freeze_towers_steps >= 0, "freeze_towers_steps", "must be >= 0")
        check(1 <= self.knowledge_asks <= 3, "knowledge_asks", "must be 1, 2 or 3")
        check(0.0 <= self.answer_swap <= 1.0, "answer_swap", "must be in [0, 1]")
        if self.knowledge:
            check(self.corpus.path is None or str(self.corpus.path).endswith(".jsonl"), "corpus.path",
                  "knowledge=true writes its corpus there: must end in .jsonl (or be unset)")
            check(0.0 < self.corpus.val_fraction < 1.0, "corpus.val_fraction",
                  "knowledge=true holds facts out: must be in (0, 1)")

    def model_for(self, tokenizer, chunk_tokens: int) -> RealmConfig:
        """The model config completed with the chunk store's vocabulary, special ids and t."""
        return replace(self.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                       cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, mask_id=tokenizer.mask_id,
                       chunk_tokens=chunk_tokens)

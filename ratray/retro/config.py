"""RETRO's configs: the model (`RetroConfig`, the fields of the `model:` section) and the job.

Torch-free, so a job's config is loaded and checked before anything heavy is imported. Every
default is documented once, here, next to the field; ratray/config.py documents the shared
sections (corpus, chunks, embed, index, service, train).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ratray.config import BuildConfig, ConfigError, TrainConfig, check, section

# ---------------------------------------------------------------------------------------------
# the model (ratray/retro/model.py)


@dataclass
class RetroConfig:
    # vocabulary, pad id and chunk length: None in a job config, filled from the chunk store
    vocab_size: int | None = None  # LM tokenizer vocabulary
    pad_id: int | None = None  # ignored as target; masked as neighbour key
    chunk_tokens: int | None = None  # m: tokens per chunk (the chunk store's chunks.chunk_tokens)
    seq_len: int = 512  # training n, a multiple of m (l = n/m chunks); forward takes any l*m
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm
    cca_layers: tuple[int, ...] | None = None  # 1-based; None: every 3rd from max(1, n_layer//2)
    enc_layers: int = 2
    enc_d_model: int = 128  # D
    enc_n_head: int = 4
    k: int = 2  # neighbours per chunk used in training
    neighbour_len: int | None = None  # r; None: 2*chunk_tokens ([N, F])
    model: str = "retro"  # retro | baseline (same decoder, no encoder, no CCA); jobs: model_type
    zero_init_cca: bool = True  # CCA output projections start at 0: untrained RETRO == RETRO[OFF]
    # These two make CCA learn to copy from a neighbour in tens of steps instead of hundreds
    # (bench/cca_copy.py; the why is in ratray/retro/model.py). 0 / False: plain RoPE, plain init.
    cca_prior_slope: float = 2.0  # CCA logit bias -slope_h*|t-(i+1)|, slope_h = this*2^(-8h/n_head)
    copy_init: bool = True  # the value path starts as a copy of the attended token's embedding
    # CCA logit bonus (learnable per head, starts here) for keys whose preceding neighbour tokens
    # equal the query's current token (+ again if the one before matches too): induction matching
    # of a neighbour that holds the text at any offset (ratray/retro/model.py). 0: off
    cca_match_bias: float = 2.0

    def __post_init__(self) -> None:
        def ok(cond: bool, name: str, msg: str) -> None:
            check(cond, f"model.{name}", f"{msg}, got {getattr(self, name)!r}")

        ok(self.vocab_size is None or self.vocab_size >= 1, "vocab_size", "must be >= 1")
        ok(self.pad_id is None or self.vocab_size is None or 0 <= self.pad_id < self.vocab_size,
           "pad_id", "must be in [0, vocab_size)")
        ok(self.chunk_tokens is None or self.chunk_tokens >= 1, "chunk_tokens", "must be >= 1")
        ok(self.seq_len >= 1 and (self.chunk_tokens is None or self.seq_len % self.chunk_tokens == 0),
           "seq_len", f"must be a positive multiple of chunk_tokens ({self.chunk_tokens})")
        ok(self.n_layer >= 1, "n_layer", "must be >= 1")
        ok(self.n_head >= 1 and self.d_model % (2 * self.n_head) == 0, "n_head",
           f"must be >= 1 and divide d_model ({self.d_model}) into even head sizes (RoPE)")
        ok(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        ok(self.model in ("retro", "baseline"), "model", "must be 'retro' or 'baseline'")
        ok(self.enc_layers >= 1, "enc_layers", "must be >= 1")
        ok(self.enc_n_head >= 1 and self.enc_d_model % (2 * self.enc_n_head) == 0,
           "enc_n_head", f"must be >= 1 and divide enc_d_model ({self.enc_d_model}) into even "
           "head sizes (RoPE)")
        ok(self.k >= 1, "k", "must be >= 1")
        ok(self.cca_prior_slope >= 0, "cca_prior_slope", "must be >= 0")
        ok(self.cca_match_bias >= 0, "cca_match_bias", "must be >= 0")
        if self.neighbour_len is None and self.chunk_tokens is not None:
            self.neighbour_len = 2 * self.chunk_tokens
        ok(self.neighbour_len is None or self.neighbour_len >= 1, "neighbour_len", "must be >= 1")
        if self.cca_layers is None:
            self.cca_layers = tuple(range(max(1, self.n_layer // 2), self.n_layer + 1, 3))
        self.cca_layers = tuple(self.cca_layers)  # YAML gives lists
        ok(len(self.cca_layers) >= 1 and all(1 <= i <= self.n_layer for i in self.cca_layers)
           and len(set(self.cca_layers)) == len(self.cca_layers), "cca_layers",
           f"must be distinct layer numbers in 1..n_layer ({self.n_layer})")
        self.cca_layers = tuple(sorted(self.cca_layers))

    @property
    def complete(self) -> bool:
        """Vocabulary, pad id and chunk length known: a model can be built."""
        return None not in (self.vocab_size, self.pad_id, self.chunk_tokens)

    def for_store(self, vocab_size: int, pad_id: int, chunk_tokens: int) -> RetroConfig:
        """This config completed with what the chunk store decides."""
        return replace(self, vocab_size=vocab_size, pad_id=pad_id, chunk_tokens=chunk_tokens)

    @classmethod
    def tiny(cls, **overrides) -> RetroConfig:
        """For tests: m=4, n=16, 2 layers (CCA at 1 and 2), d=32."""
        base = dict(vocab_size=64, pad_id=0, chunk_tokens=4, seq_len=16, n_layer=2, n_head=2,
                    d_model=32, cca_layers=(1, 2), enc_layers=1, enc_d_model=16, enc_n_head=2)
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, vocab_size: int, pad_id: int, **overrides) -> RetroConfig:
        """The defaults (6 layers, d 256, m 64, n 512, CCA at 3 and 6): a CPU-sized RETRO."""
        return cls(vocab_size=vocab_size, pad_id=pad_id, **{"chunk_tokens": 64, **overrides})

    def as_baseline(self) -> RetroConfig:
        return replace(self, model="baseline")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------------------
# the job (jobs/retro_pretrain.py; jobs/build_index.py reads the same file)


@dataclass
class RetroJobConfig(BuildConfig):
    model_type: str = "retro"  # retro | baseline (same decoder, no CCA, no encoder): --model
    model: RetroConfig = field(default_factory=RetroConfig)  # vocabulary, pad id, m: chunk store
    train: TrainConfig = section(TrainConfig, run_name="retro-demo")  # RETRO's default run name
    experiment: str = "ratray-retro"  # MLflow experiment
    # RETROfit (RETRO §4.2): a finished baseline run of this workdir whose decoder is loaded and
    # frozen; only the encoder and the CCA layers train (they start at zero: step 0 = the baseline)
    init_from: str | None = None

    def __post_init__(self) -> None:
        check(self.model_type in ("retro", "baseline"), "model_type", "must be retro|baseline")
        for name in ("vocab_size", "pad_id", "chunk_tokens"):
            if getattr(self.model, name) is not None:
                raise ConfigError(f"config 'model.{name}': comes from the chunk store"
                                  + (": set chunks.chunk_tokens instead" if name == "chunk_tokens" else ""))
        check(self.model.model in ("retro", self.model_type), "model.model",
              "set model_type (or --model) instead")
        if self.init_from is not None:
            check(self.model_type == "retro", "init_from",
                  "RETROfits a baseline into RETRO: model_type=retro")
            check(self.model.zero_init_cca, "init_from",
                  "needs model.zero_init_cca=true (the CCA starts at zero: step 0 equals the baseline)")
            check(self.init_from != self.train.run_name, "init_from", "must name another run")
        if self.index.hybrid != "off":  # fused lists need each query's text: a table made ahead
            check(self.train.retrieval == "precomputed", "index.hybrid",
                  f"{self.index.hybrid} (dense + BM25) needs train.retrieval=precomputed; online "
                  "retrieval searches dense vectors only")
        self.model = replace(self.model, model=self.model_type)

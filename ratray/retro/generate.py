"""RETRO sampling with causal retrieval and a KV cache (what jobs/generate.py calls).

    prompt text ─ the run's tokenizer (the chunk store's) ─ token ids
      └─ one token at a time: Retro.decode_step (KV cache: each token costs one position)
           ─ logits ─ sample (temperature, top-k; greedy at temperature 0) ─ next token
      └─ a token that completes chunk u (m = chunk_tokens tokens, 64 in RETRO):
           chunk u's text ─ frozen sentence-BERT (the index's embedding model) ─ index search
           (the shard actors' serving version, asked again for every chunk) ─ k chunk ids
           ─ chunk store ─ [N, F] tokens (k, 2m) ─ fed with that token: the encoder runs once,
           CCA serves them to positions u*m+m-1 .. u*m+2m-2, i.e. the predictions of chunk u+1

This is the alignment of `Retro.forward` (its CCA group u), so cached generation reproduces the
full forward over the same tokens and neighbours (tests/test_generate.py). RETRO's causality holds:
chunk u's neighbours depend only on chunk u's tokens, all known when they are used.

No leakage filter: at generation time the text belongs to no document of the database, so every
database chunk is admissible (training excludes the sequence's own documents; here there are
none). The chunk store is read through its lookups at every retrieval, so chunks appended to the
database after the run trained (a newer index version) are served like the others.

`--no-retrieval` is RETRO[OFF] as evaluate scores it: no neighbours, the encoder and CCA skipped.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ratray.config import ConfigError, ServiceConfig, to_dict

SNIPPET_CHARS = 100  # one-line snippet of a neighbour chunk in the report


# ---------------------------------------------------------------------------------------------
# retrieval for one completed chunk


@dataclass
class Retrieved:
    """The neighbours of one completed chunk: what CCA reads while the next chunk is predicted."""
    chunk: int  # u: chunk index in the sequence (prompt and continuation together)
    text: str  # the chunk's text, the query
    ids: np.ndarray  # (k,) database chunk ids, best first (-1: fewer in the database)
    distances: np.ndarray  # (k,)
    version: int  # index version that answered
    tokens: torch.Tensor  # (k, 2m) [N, F] token ids, pad where missing


class Retriever:
    """Chunk tokens → neighbours: embed the chunk's text, search the index (`ShardedIndex`, or
    anything with `search(q, k)` → SearchResult), read [N, F] from the chunk store. `hybrid` (the
    run's IndexConfig, `hybrid` rrf | weighted): the dense and BM25 lists of the text fused."""

    def __init__(self, index, store, encoder, k: int, batch_size: int = 32, hybrid=None):
        if k < 1:
            raise ConfigError(f"neighbours: k must be >= 1, got {k}")
        self.index, self.store, self.encoder, self.k, self.batch_size = index, store, encoder, k, batch_size
        self.hybrid = hybrid if hybrid is not None and hybrid.hybrid != "off" else None
        self.searches, self.seconds = 0, 0.0  # searches made, time spent embedding + searching

    def text(self, tokens: list[int]) -> str:
        return self.store.tokenizer.decode(tokens)  # as the chunk store decodes its chunks

    def __call__(self, chunk: int, tokens: list[int]) -> Retrieved:
        from ratray.index.embed import encode

        t0 = time.perf_counter()
        text = self.text(tokens)
        q = encode(self.encoder, [text], self.batch_size)  # (1, dim)
        res = (self.index.search(q, self.k) if self.hybrid is None  # the serving version, now
               else self.index.hybrid_search(q, [text], self.k, self.hybrid))
        self.searches, self.seconds = self.searches + 1, self.seconds + time.perf_counter() - t0
        ids = np.asarray(res.ids[0], np.int64)  # (k,)
        nb = torch.from_numpy(self.store.with_continuation(ids).astype(np.int64))  # (k, 2m)
        return Retrieved(chunk, text, ids, np.asarray(res.distances[0]), int(res.version), nb)


# ---------------------------------------------------------------------------------------------
# the sampling loop


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # the continuation
    chunks: list[Retrieved]  # one per chunk completed before the last token was sampled
    seconds: float
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) per sampled token (keep_logits)


def check_sampling(max_tokens: int, temperature: float, top_k: int) -> None:
    """ConfigError naming the flag of a bad sampling setting."""
    for ok, flag, rule, got in [(max_tokens >= 1, "--max-tokens", ">= 1", max_tokens),
                                (temperature >= 0, "--temperature", ">= 0 (0 = greedy)", temperature),
                                (top_k >= 0, "--top-k", ">= 0 (0 = all tokens)", top_k)]:
        if not ok:
            raise ConfigError(f"{flag}: must be {rule}, got {got}")


def sample(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator,
           pad_id: int) -> int:
    """logits (V,) → a token id: argmax at temperature 0, else softmax(logits / T) over the top_k
    (0 = all). The pad token is never sampled (it is never a training target)."""
    logits = logits.float().clone()
    logits[pad_id] = float("-inf")
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


class _Recompute:
    """The reference path (no cache): the whole forward over all tokens at every step."""

    def __init__(self, model):
        self.model, self.idx, self.nb = model, [], {}

    def feed(self, tok: int, nb: torch.Tensor | None) -> torch.Tensor:
        m, pad = self.model.cfg.chunk_tokens, self.model.cfg.pad_id
        p = len(self.idx)
        self.idx.append(tok)
        if nb is not None:
            self.nb[p // m] = nb
        l = p // m + 1
        idx = torch.full((1, l * m), pad, dtype=torch.long)  # causal: the tail does not matter
        idx[0, : p + 1] = torch.tensor(self.idx)
        table = None
        if self.nb:  # chunks without neighbours (the last, incomplete one): all pad = no CCA
            like = next(iter(self.nb.values()))
            table = torch.stack([self.nb.get(u, torch.full_like(like, pad)) for u in range(l)])[None]
        with torch.no_grad():
            return self.model(idx, table)[0][0, p]  # (V,)


class _Cached:
    def __init__(self, model):
        from ratray.retro.model import DecodeCache

        self.model, self.cache = model, DecodeCache(len(model.blocks))

    def feed(self, tok: int, nb: torch.Tensor | None) -> torch.Tensor:
        return self.model.decode_step(torch.tensor([tok]), self.cache, None if nb is None else nb[None])[0]


def generate(model, prompt: list[int], max_tokens: int, retriever: Retriever | None = None,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, cache: bool = True,
             keep_logits: bool = False) -> Generation:
    """Sample `max_tokens` tokens after `prompt` (token ids). With a `retriever` (and a retro
    model) every chunk completed by the prompt or the continuation retrieves once, when its last
    token is fed; its neighbours serve the next chunk. `cache=False` recomputes the full forward
    every step (the reference the KV cache must equal)."""
    if not prompt:
        raise ConfigError("prompt: empty (it must hold at least one token)")
    check_sampling(max_tokens, temperature, top_k)
    m, pad = model.cfg.chunk_tokens, model.cfg.pad_id
    retrieve = retriever if retriever is not None and model.retrieval else None
    step = _Cached(model) if cache else _Recompute(model)
    gen = torch.Generator().manual_seed(seed)
    seq, chunks, kept = list(prompt), [], []
    t0 = time.perf_counter()

    def feed(p: int) -> torch.Tensor:  # token p in; logits for p+1 out
        nb = None
        if retrieve is not None and p % m == m - 1:  # chunk p // m is complete: retrieve once
            chunks.append(retrieve(p // m, seq[p - m + 1: p + 1]))
            nb = chunks[-1].tokens
        return step.feed(seq[p], nb)

    with torch.no_grad():
        for p in range(len(prompt)):
            logits = feed(p)
        for t in range(max_tokens):
            if keep_logits:
                kept.append(logits)
            seq.append(sample(logits, temperature, top_k, gen, pad))
            if t + 1 < max_tokens:  # the last token is not fed: nothing would read its logits
                logits = feed(len(seq) - 1)
    return Generation(list(prompt), seq[len(prompt):], chunks, time.perf_counter() - t0, kept)


# ---------------------------------------------------------------------------------------------
# a finished run, its index, the report


@dataclass
class GenerateSettings:
    max_tokens: int = 128  # tokens sampled after the prompt
    temperature: float = 0.0  # 0 = greedy (deterministic); > 0 samples softmax(logits / T)
    top_k: int = 0  # sample among the top_k tokens only; 0 = all
    seed: int = 0  # the sampler's seed
    retrieval: bool = True  # False: RETRO[OFF] (no neighbours, encoder and CCA skipped)
    k: int = 0  # neighbours per chunk; 0 = the run's training k
    index_name: str | None = None  # running shard actors' name; None: launch ours for the job
    namespace: str | None = None  # their Ray namespace; None: the run's service.namespace
    cache: bool = True  # KV cache; False recomputes the full forward per token (the reference)

    def __post_init__(self) -> None:
        check_sampling(self.max_tokens, self.temperature, self.top_k)
        if self.k < 0:
            raise ConfigError(f"--neighbours: must be >= 1 (or 0 = the run's k), got {self.k}")


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text from `--prompt` or `--prompt-file` (exactly one; not empty)."""
    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {path}: no such file")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from None
    if not prompt.strip():
        raise ConfigError(f"{'--prompt-file ' + str(prompt_file) if prompt_file else '--prompt'}: "
                          "the prompt is empty")
    return prompt


def _open_index(wd, job, s: GenerateSettings, run_name: str):
    """(client, launched): the running actors named `s.index_name`, or ours on the workdir's
    index (a name no training job uses, so shutting it down never touches theirs)."""
    from ratray.index.service import ShardedIndex

    ns = s.namespace or job.service.namespace
    if s.index_name:
        index = ShardedIndex.connect(s.index_name, ns, timeout=min(60, job.service.timeout_s),
                                     search_timeout=job.service.timeout_s)
        if Path(index.index_dir).resolve() != wd.index.resolve():
            raise ConfigError(f"--index-name {s.index_name}: its actors serve {index.index_dir}, "
                              f"not this workdir's index {wd.index}")
        return index, False
    svc = ServiceConfig(**{**to_dict(job.service), "namespace": ns,
                           "name": f"{run_name}-generate-{os.getpid()}"})
    return ShardedIndex.launch(str(wd.index), svc), True


def generate_run(workdir: str, run_name: str, prompt: str, settings: GenerateSettings | None = None) -> dict:
    """Generate from a finished RETRO (or baseline) run's checkpoint; the report (a dict)."""
    import ray

    from ratray.index.embed import load_encoder
    from ratray.retro.driver import resolve
    from ratray.retro.evaluate import load_run
    from ratray.workdir import Workdir

    s = settings or GenerateSettings()
    if not prompt.strip():
        raise ConfigError("prompt: empty")
    wd = Workdir(workdir)
    run = load_run(wd, run_name)
    job = dataclasses.replace(run.job, workdir=str(wd.root))
    store = resolve(job).store  # the index's chunk store: its tokenizer, its chunks
    ids = store.tokenizer.encode(prompt)
    limit = run.cfg.seq_len
    if len(ids) + s.max_tokens > limit:
        raise ConfigError(f"prompt ({len(ids)} tokens) + --max-tokens {s.max_tokens} > {limit}: the "
                          f"run was trained on {limit}-token sequences (positions beyond are unseen)")
    retrieval = s.retrieval and run.model.retrieval
    k = s.k or run.cfg.k
    index, launched, retriever = None, False, None
    if retrieval:
        if not ray.is_initialized():
            ray.init(namespace=job.service.namespace, log_to_driver=False)
        index, launched = _open_index(wd, job, s, run_name)
    try:
        if retrieval:
            if k > index.ntotal:
                raise ConfigError(f"--neighbours {k}: the database holds {index.ntotal} chunks")
            encoder = load_encoder(job.embed.model, job.embed.device, job.embed.threads_per_actor)
            retriever = Retriever(index, store, encoder, k, job.embed.batch_size, job.index)
        g = generate(run.model, ids, s.max_tokens, retriever, s.temperature, s.top_k, s.seed, s.cache)
    finally:
        if launched:
            index.shutdown()
    return report(run_name, run.cfg, store, g, s, retriever, index, launched)


def report(run_name: str, cfg, store, g: Generation, s: GenerateSettings,
           retriever: Retriever | None, index, launched: bool) -> dict:
    """What jobs/generate.py prints (or dumps as JSON)."""
    m, n_prompt = cfg.chunk_tokens, len(g.prompt)
    dec = store.tokenizer.decode
    chunks = []
    for r in g.chunks:
        ok = r.ids >= 0
        ids = r.ids[ok]
        first = (r.chunk + 1) * m  # the tokens whose predictions read these neighbours
        chunks.append({
            "chunk": r.chunk, "tokens": [r.chunk * m, first - 1], "used_for": [first, first + m - 1],
            "used_for_generated": first + m - 1 >= n_prompt, "version": r.version, "text": r.text,
            "neighbours": [{"chunk_id": int(c), "doc_id": str(d), "distance": float(x),
                            "snippet": " ".join(t.split())[:SNIPPET_CHARS]}
                           for c, d, x, t in zip(ids, store.doc_ids(ids), r.distances[ok],
                                                 store.texts(ids))]})
    n = n_prompt + len(g.tokens) - 1  # tokens fed through the model
    return {"run": run_name, "model_type": cfg.model, "retrieval": "off" if retriever is None else "on",
            "neighbours_k": 0 if retriever is None else retriever.k, "chunk_tokens": m,
            "index": None if index is None else {"name": index.name, "namespace": index.namespace,
                                                 "launched_for_this_job": launched,
                                                 "versions": sorted({c["version"] for c in chunks})},
            "settings": dataclasses.asdict(s), "prompt": dec(g.prompt), "prompt_tokens": n_prompt,
            "continuation": dec(g.tokens), "tokens": g.tokens, "chunks": chunks,
            "seconds": round(g.seconds, 3), "tokens_per_s": round(n / g.seconds, 1) if g.seconds else None,
            "retrieval_s": round(retriever.seconds, 3) if retriever else 0.0}


def format_generation(r: dict) -> str:
    """The report as text: the continuation, then per completed chunk the neighbours it served."""
    ret = (f"retrieval on: k={r['neighbours_k']}, index {r['index']['namespace']}/{r['index']['name']}"
           f" version(s) {r['index']['versions']}" if r["retrieval"] == "on" else "retrieval off")
    lines = [f"run {r['run']} ({r['model_type']}), {ret}; {r['prompt_tokens']} prompt + "
             f"{len(r['tokens'])} generated tokens in {r['seconds']:.2f} s ({r['tokens_per_s']} "
             f"positions/s; retrieval {r['retrieval_s']:.2f} s)",
             "", "--- prompt", r["prompt"], "", "--- continuation", r["continuation"], ""]
    if r["retrieval"] == "on":
        lines.append(f"--- neighbours ({len(r['chunks'])} completed chunks of {r['chunk_tokens']} "
                     "tokens; chunk u's neighbours serve the predictions of chunk u+1)")
        for c in r["chunks"]:
            a, b = c["used_for"]
            served = ("prompt" if b < r["prompt_tokens"] else "generated" if a >= r["prompt_tokens"]
                      else "prompt and generated")
            lines.append(f"chunk {c['chunk']} (tokens {c['tokens'][0]}-{c['tokens'][1]}) -> tokens "
                         f"{a}-{b} ({served}), index version {c['version']}")
            lines += [f"  #{j + 1} chunk {nb['chunk_id']} doc {nb['doc_id']} d={nb['distance']:.3f}: "
                      f"{nb['snippet']}" for j, nb in enumerate(c["neighbours"])]
    return "\n".join(lines)

"""RETRO's per-step work inside the shared Ray Train worker (ratray/train/worker.py).

    per step:  request neighbours of batch t+1 (async, shard actors)  ─┐
               forward/backward/step on batch t (DeepSpeed, ZeRO)      │ overlap
               wait for batch t+1's neighbours  ◄──────────────────────┘

The one place where the RETRO model meets retrieval: a precomputed neighbour table or the online
fetcher (`NeighbourFetcher`, prefetching one micro-batch ahead). Evaluation: validation
bits-per-byte with retrieval on (RETRO[ON]) and off (RETRO[OFF]), or the baseline's.
"""
from __future__ import annotations

import numpy as np

from ratray.retro.config import RetroJobConfig
from ratray.train.worker import TrainWorker, allreduce_sum


class Retrieval:
    """Neighbour ids for training batches: a precomputed table or the online fetcher (prefetching)."""

    def __init__(self, mode: str, table_ids: np.ndarray | None, fetcher):
        self.mode, self.table_ids, self.fetcher = mode, table_ids, fetcher
        self.pending: dict[tuple, object] = {}
        self.wait_s = self.latency_s = 0.0
        self.requests = 0

    def prefetch(self, key: tuple, seq_idx: np.ndarray) -> None:
        if self.mode == "online" and key not in self.pending:
            self.pending[key] = self.fetcher.request(seq_idx)

    def get(self, key: tuple, seq_idx: np.ndarray) -> np.ndarray:
        if self.mode == "precomputed":
            return self.table_ids[seq_idx]
        self.prefetch(key, seq_idx)
        ids, wait, latency = self.pending.pop(key).result()
        self.wait_s += wait
        self.latency_s += latency
        self.requests += 1
        return ids

    def take_stats(self) -> dict:
        """Per request since the last call: the time the step blocked on retrieval (prefetched
        search, filter, widening), the request's whole latency, and the widening searches."""
        if self.mode != "online":
            return {}
        n = max(1, self.requests)
        widen = self.fetcher.stats
        out = {"retrieval_wait_ms": 1e3 * self.wait_s / n, "retrieval_inflight_ms": 1e3 * self.latency_s / n,
               "retrieval_widen_searches": widen.get("widen_searches", 0) / n,
               "retrieval_widened_rows": widen.get("widened_rows", 0) / n}
        self.wait_s = self.latency_s = 0.0
        self.requests = 0
        widen.clear()
        return out


class RetroWorker(TrainWorker):
    job_cls = RetroJobConfig

    def setup(self) -> None:
        from ratray.data.store import ChunkStore
        from ratray.index.service import ShardedIndex
        from ratray.retro.batches import RetroBatches
        from ratray.retro.model import RetroConfig
        from ratray.retro.neighbours import ChunkVectors, NeighbourFetcher, sequence_layout

        c, t = self.config, self.t
        store = ChunkStore.open(c["store_path"])
        self.mcfg = RetroConfig(**c["model"])
        l = self.mcfg.seq_len // self.mcfg.chunk_tokens
        self.train = RetroBatches(store, sequence_layout(store, "train", l), self.mcfg.k)
        self.val = RetroBatches(store, sequence_layout(store, "val", l), self.mcfg.k)
        self.retro = self.mcfg.model == "retro"
        fetcher = None
        if self.retro and t.retrieval == "online":
            index = ShardedIndex.connect(c["service_name"], namespace=c["namespace"],
                                         search_timeout=self.job.service.timeout_s)
            fetcher = NeighbourFetcher(store, index, self.train.layout, self.mcfg.k,
                                       ChunkVectors(c["vectors_path"]))
        table = np.load(c["train_neighbours"]) if self.retro and t.retrieval == "precomputed" else None
        self.val_nbrs = np.load(c["val_neighbours"]) if self.retro else None
        self.retrieval = Retrieval(t.retrieval, table, fetcher)

    def n_examples(self) -> int:
        return len(self.train)

    def build_model(self):
        """The model; RETROfitting (`init_checkpoint`): the baseline's decoder, frozen."""
        from ratray.retro.model import Retro

        model = Retro(self.mcfg)
        if self.config.get("init_checkpoint"):
            from ratray.retro.retrofit import freeze_decoder, load_decoder
            from ratray.train.trainer import load_weights

            load_decoder(model, load_weights(self.config["init_checkpoint"]))
            self.trainable, self.frozen = freeze_decoder(model)
        return model, model.param_groups(self.t.weight_decay)

    def tags(self) -> dict:
        tags = {"ratray.model_type": self.mcfg.model, "ratray.retrieval": self.t.retrieval}
        if self.job.init_from:
            tags.update({"ratray.retrofit_from": self.job.init_from,
                         "ratray.trainable_params": str(self.trainable),
                         "ratray.frozen_params": str(self.frozen)})
        return tags

    def start(self, step: int) -> None:
        if self.retro:
            self.retrieval.prefetch((step, 0), self.batch_rows(step, 0))

    def micro_step(self, step: int, micro: int):
        import torch

        sel = self.batch_rows(step, micro)
        nbr = self.retrieval.get((step, micro), sel) if self.retro else None
        nxt = self.next_micro(step, micro)
        if self.retro and nxt[0] < self.t.steps:
            self.retrieval.prefetch(nxt, self.batch_rows(*nxt))  # in flight while we compute
        idx, tgt = self.train.inputs_targets(sel)
        nb = None if nbr is None else torch.from_numpy(self.train.neighbours(nbr)).to(self.device)
        _, loss = self.engine(torch.from_numpy(idx).to(self.device), nb,
                              torch.from_numpy(tgt).to(self.device))
        return loss

    def interval_metrics(self, n_steps: float, seconds: float) -> dict:
        t = self.t
        tokens_per_step = t.micro_batch * t.grad_accum * self.world * self.mcfg.seq_len
        return {"tokens_per_s": tokens_per_step * n_steps / max(seconds, 1e-9),
                **self.retrieval.take_stats()}

    def bpb(self, nbr_ids: np.ndarray | None, rows: np.ndarray) -> dict:
        """Validation bits-per-byte of `rows` on this rank, summed over every rank."""
        from ratray.eval.lm import lm_sums
        from ratray.eval.metrics import lm_summary

        sums = lm_sums(self.engine, self.val, nbr_ids, rows, self.t.micro_batch, self.device)
        return lm_summary(*allreduce_sum(list(sums)))

    def evaluate(self) -> dict:
        t = self.t
        n = len(self.val) if t.eval_sequences == 0 else min(t.eval_sequences, len(self.val))
        mine = np.arange(n)[self.rank::self.world]

        out = {}
        if self.retro:
            out["val_bpb_retro_on"] = self.bpb(self.val_nbrs, mine)["bpb"]
        off = self.bpb(None, mine)
        out["val_bpb_retro_off" if self.retro else "val_bpb"] = off["bpb"]
        out["val_tokens"], out["val_bytes"] = off["tokens"], off["bytes"]
        return out

    def progress_line(self, step: int, m: dict) -> str:
        parts = [f"step {step}/{self.t.steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
                 f"{m['tokens_per_s']:.0f} tok/s"]
        if "retrieval_wait_ms" in m:
            parts.append(f"retrieval wait {m['retrieval_wait_ms']:.1f} ms "
                         f"(in flight {m['retrieval_inflight_ms']:.1f} ms, "
                         f"{m['retrieval_widen_searches']:.2f} widening searches)")
        for key in ("val_bpb_retro_on", "val_bpb_retro_off", "val_bpb"):
            if key in m:
                parts.append(f"{key} {m[key]:.4f}")
        return "[ratray] " + " | ".join(parts)


def train_loop(config: dict) -> None:
    """Ray Train entry (`TorchTrainer(train_loop, train_loop_config=config)`)."""
    RetroWorker(config).run()

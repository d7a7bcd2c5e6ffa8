"""REALM's per-step work inside the shared Ray Train worker (ratray/train/worker.py).

    per step:  embed batch t+1's queries with the current query tower (no grad) ─► search_async ─┐
               forward/backward/step on batch t: p(z|x) rescored by both towers, reader, MLM  │ overlap
               batch t+1's candidates: drop the source document, take k-1 ◄──────────────────┘
    every refresh.every steps (rank 0): doc tower weights ─► object store ─► RefreshService.request
        (returns at once; the shards keep serving the old version until the swap)

The one place where the REALM model meets retrieval. Metrics (rank 0 → MLflow): loss,
masked-token accuracy with retrieval and with the null document only, retrieval utility, p(∅|x),
the index version that served the batch, staleness (steps since the serving index's weights),
refresh counts and times; the same on held-out queries.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from ratray.eval.metrics import REALM_SUMS, realm_rates
from ratray.realm.config import IGNORE, RealmJobConfig
from ratray.train.worker import TrainWorker, allreduce_sum

TOWER_GROUPS = (0, 1)  # Realm.param_groups: towers (decay, no decay), then reader (decay, no decay)


def hold_towers(model, param_groups: list[dict], frozen: bool) -> None:
    """The reader warm-up, applied before each optimizer step: frozen → the towers run without
    autograd (`model.train_towers`) and their groups' learning rate is 0 for this step (the
    schedule sets it again after the step, so nothing else changes); AdamW with lr 0 leaves a
    parameter exactly as it was, weight decay included."""
    model.train_towers = not frozen
    if frozen:
        for g in TOWER_GROUPS:
            param_groups[g]["lr"] = 0.0


def trim(ids: np.ndarray, labels: np.ndarray, tok: np.ndarray, pad_id: int) -> tuple:
    """Cut a batch's right padding: queries (b q) and labels to the longest query, blocks (b k1 t)
    to the longest block (the model reads any widths; pads are never attended to). Short facts in
    48-wordpiece blocks: the reader's rows shrink from 75 to ~45 tokens."""
    def width(used: np.ndarray) -> int:  # (w,) some row holds a token at this position
        return int(np.flatnonzero(used)[-1]) + 1 if used.any() else 1

    qw = max(width((ids != pad_id).any(0)), width((labels != IGNORE).any(0)))
    tw = width((tok != pad_id).any((0, 1)))
    return ids[:, :qw], labels[:, :qw], tok[:, :, :tw]


class Candidates:
    """Retrieval for batches of masked queries: async search, source-document filter, block tokens."""

    def __init__(self, store, index, queries, k: int, chunk_tokens: int):
        from ratray.index.filtered import DocCodes

        self.store, self.index, self.queries = store, index, queries
        self.k1, self.chunk_tokens = k - 1, chunk_tokens
        self.docs = DocCodes(store)
        self.wait_s, self.requests, self.versions = 0.0, 0, []

    def request(self, sel: np.ndarray, embed) -> tuple:
        """sel: rows of `queries`; embed: ids (b q) -> (b p) numpy (the current query tower)."""
        from ratray.index.filtered import first_request

        e = embed(self.queries.ids[sel])
        src = self.docs.of(self.queries.block_ids[sel])[:, None]  # (b 1): the source document
        K = first_request(self.index.ntotal, self.k1, self.docs.excluded_chunks(src))
        return sel, e, src, self.index.search_async(e, K)

    def collect(self, pending: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """-> candidate block ids (b k-1, -1 = missing), tokens (b k-1 t), valid (b k-1), version."""
        from ratray.index.filtered import search_filtered

        sel, e, src, fut = pending
        t0 = time.perf_counter()
        first = fut.result()
        self.wait_s += time.perf_counter() - t0
        self.requests += 1
        self.versions.append(first.version)
        ids, _ = search_filtered(self.index, e, src, self.docs, self.k1, first=first)
        valid = ids >= 0
        tok = self.store.tokens(np.where(valid, ids, 0).reshape(-1), pad_to=self.chunk_tokens)
        tok = tok.reshape(len(sel), self.k1, self.chunk_tokens)
        tok[~valid] = self.store.tokenizer.pad_id
        return ids, tok, valid, first.version

    def take_stats(self) -> dict:
        out = {"retrieval_wait_ms": 1e3 * self.wait_s / max(1, self.requests)}
        if self.versions:
            out["index_version"] = float(self.versions[-1])
        self.wait_s, self.requests, self.versions = 0.0, 0, []
        return out


class RealmWorker(TrainWorker):
    job_cls = RealmJobConfig
    history_keys = ("acc_retrieval", "acc_null", "index_version")

    # -- set-up --------------------------------------------------------------------------------

    def setup(self) -> None:
        import ray

        from ratray.data.store import ChunkStore
        from ratray.index.service import ShardedIndex
        from ratray.realm.heldout import scored_queries
        from ratray.realm.knowledge import gold_blocks
        from ratray.realm.masking import make_queries
        from ratray.realm.model import RealmConfig
        from ratray.realm.swap import AnswerSwap

        c, t, job = self.config, self.t, self.job
        store = ChunkStore.open(c["store_path"])
        self.mcfg = RealmConfig(**c["model"])
        mask = job.masking
        train_ids = store.with_doc_prefix(job.query_docs, store.split_ids("train"))
        train_q = make_queries(store, train_ids, self.mcfg.query_tokens, t.seed, mask.mode, mask.rate)
        val_ids = store.with_doc_prefix(job.query_docs, store.split_ids("val"))
        val_ids = val_ids if job.eval_queries == 0 else val_ids[:job.eval_queries]
        val_q = make_queries(store, val_ids, self.mcfg.query_tokens, t.seed + 1, mask.mode, mask.rate)
        index = ShardedIndex.connect(c["service_name"], namespace=c["namespace"],
                                     search_timeout=self.job.service.timeout_s)
        self.refresh = ray.get_actor(f"{c['service_name']}-refresh", namespace=c["namespace"]) \
            if self.rank == 0 else None
        self.train_c = Candidates(store, index, train_q, self.mcfg.k, self.mcfg.chunk_tokens)
        self.val_c = Candidates(store, index, val_q, self.mcfg.k, self.mcfg.chunk_tokens)
        self.val_gold, self.val_cluster = gold_blocks(store, val_q.block_ids)  # (n,) each
        self.val_scored = scored_queries(val_q.labels, store.tokenizer)  # (n,)
        self.swap = AnswerSwap(train_q.labels, gold_blocks(store, train_q.block_ids)[0], job.answer_swap,
                               store.tokenizer.mask_id, t.seed + self.rank) if job.answer_swap else None
        self.sums = dict.fromkeys(REALM_SUMS, 0.0)
        self.pending = None
        self.restored: dict | None = None
        self.status: dict | None = None  # the refresh service's last status (rank 0)

    def n_examples(self) -> int:
        return len(self.train_c.queries)

    def build_model(self):
        """All three encoders from the pretrained sentence-BERT; groups (towers | reader) x
        (decay | no decay), the towers at `tower_lr_scale` of the reader's rate."""
        from ratray.realm.model import Realm

        model = Realm.from_pretrained(self.mcfg, self.config["weights"])
        return model, model.param_groups(self.t.weight_decay, self.t.lr, self.job.tower_lr_scale)

    def resume(self, client: dict) -> None:
        """Serve the checkpoint's index version again; if its files are gone, rebuild from these
        weights (every rank takes part: ZeRO-3 gathers the doc tower collectively)."""
        import ray

        missing = 0.0
        if self.rank == 0 and client.get("refresh"):
            self.restored = ray.get(self.refresh.restore.remote(client["refresh"]))
            missing = 0.0 if self.restored["available"] else 1.0
        if allreduce_sum([missing])[0] > 0:
            self.request_refresh(client["step"])

    def tags(self) -> dict:
        tags = {"ratray.model_type": "realm", "ratray.masking": self.job.masking.mode,
                "ratray.refresh_every": str(self.job.refresh.every)}
        if self.restored:
            tags["ratray.restored_index_version"] = str(self.restored["serving_version"])
        return tags

    # -- the towers ----------------------------------------------------------------------------

    def gathered(self, module):
        """ZeRO-3 partitions parameters: gather them (a collective: all ranks)."""
        import deepspeed

        if self.t.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(module.parameters()))
        return contextlib.nullcontext()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Query wordpieces (b q) → the current query tower's embeddings (b p), no gradient."""
        import torch

        net = self.engine.module
        with torch.no_grad(), self.gathered(net.query_tower):
            x = torch.from_numpy(ids.astype(np.int64)).to(self.device)
            return net.embed_queries(x).float().cpu().numpy()

    def request_refresh(self, step: int) -> None:
        from ratray.index.refresh import put_weights

        net = self.engine.module
        with self.gathered(net.doc_tower):
            if self.rank == 0:
                weights = {k: v.float() for k, v in net.doc_state_dict().items()}
                self.refresh.request.remote(put_weights(weights), step)  # fire and forget

    def tensors(self, sel: np.ndarray, cand: tuple, q: Candidates, swap=None) -> tuple:
        """Model inputs on the device: query ids, labels, candidate blocks, valid; with `swap`
        (training, answer_swap > 0) some answers replaced in the labels and the gold block."""
        import torch

        cand_ids, tok, valid, _ = cand
        ids, labels = q.queries.ids[sel], q.queries.labels[sel]
        read = None  # the towers score the blocks as indexed; the reader reads the swapped ones
        if swap is not None:
            ids, labels, read = swap.apply(sel, ids, cand_ids, tok)
        ids, labels, tok = trim(ids, labels, tok, q.store.tokenizer.pad_id)
        as_t = lambda a: torch.from_numpy(np.asarray(a).astype(np.int64)).to(self.device)  # noqa: E731
        out = (as_t(ids), as_t(labels), as_t(tok), torch.from_numpy(valid).to(self.device))
        # a swapped answer sits where the old one was, so `read` has the blocks' width
        return out if read is None else out + (as_t(read[:, :, :tok.shape[2]]),)

    # -- the steps -----------------------------------------------------------------------------

    def start(self, step: int) -> None:
        self.pending = self.train_c.request(self.batch_rows(step, 0), self.embed)

    def frozen(self, step: int) -> bool:
        return step < self.job.freeze_towers_steps

    def micro_step(self, step: int, micro: int):
        self.towers_frozen = self.frozen(step)
        hold_towers(self.engine.module, self.sched.optimizer.param_groups, self.towers_frozen)
        sel = self.batch_rows(step, micro)
        inputs = self.tensors(sel, self.train_c.collect(self.pending), self.train_c, self.swap)
        nxt = self.next_micro(step, micro)
        self.pending = self.train_c.request(self.batch_rows(*nxt), self.embed) \
            if nxt[0] < self.t.steps else None  # in flight while we compute
        out = self.engine(*inputs)
        for k in REALM_SUMS:
            self.sums[k] += float(out[k])
        return out["loss"]

    def after_step(self, done: int) -> None:
        every = self.job.refresh.every  # frozen towers: the serving index is already theirs
        if every and done % every == 0 and done < self.t.steps and done > self.job.freeze_towers_steps:
            self.request_refresh(done)

    # -- metrics -------------------------------------------------------------------------------

    def lr_metrics(self, lrs: list[float]) -> dict:
        frozen = getattr(self, "towers_frozen", False)  # the step just taken
        return {"lr": lrs[2], "lr_towers": 0.0 if frozen else lrs[0], "towers_frozen": float(frozen)}

    def interval_metrics(self, n_steps: float, seconds: float) -> dict:
        t = self.t
        tot = dict(zip(REALM_SUMS, allreduce_sum([self.sums[k] for k in REALM_SUMS])))
        self.sums = dict.fromkeys(REALM_SUMS, 0.0)
        out = {"queries_per_s": t.micro_batch * t.grad_accum * self.world * n_steps / max(seconds, 1e-9),
               **realm_rates(tot), **self.train_c.take_stats()}
        if self.swap is not None:  # shares of the interval's training queries
            swapped, eligible = allreduce_sum(list(self.swap.take_stats().values()))
            out.update(answer_swapped=swapped / max(tot["queries"], 1.0),
                       answer_swap_eligible=eligible / max(tot["queries"], 1.0))
        return out

    def status_metrics(self, step: int) -> dict:
        import ray

        if self.refresh is None:
            return {}
        st = self.status = ray.get(self.refresh.status.remote())
        out = {"index_serving_version": float(st["serving_version"]),
               "refreshes_completed": float(st["completed"]), "refreshes_failed": float(st["failed"]),
               "refresh_requests_coalesced": float(st["coalesced"])}
        if st["serving_step"] is not None:
            out["staleness_steps"] = float(step - st["serving_step"])
        if st["history"]:
            last = st["history"][-1]
            out.update(refresh_total_s=last["total_s"], refresh_embed_s=last["embed_s"],
                       refresh_build_s=last["build_s"], refresh_swap_s=last["swap_s"],
                       reembed_blocks_per_s=last["blocks_per_s"])
        if self.restored:
            out["index_version_restored"] = float(self.restored["serving_version"])
        return out

    def evaluate(self) -> dict:
        """Held-out masked queries, split over the ranks; sums and the per-query table (for the
        intervals, ratray/realm/heldout.py) all-reduced."""
        import torch

        from ratray.realm.heldout import ROW_FIELDS, gold_hits, save_rows, summarize

        t, q = self.t, self.val_c
        n = len(q.queries)
        mine = np.arange(n)[self.rank::self.world]
        sums = dict.fromkeys(REALM_SUMS, 0.0)
        table = np.zeros((len(ROW_FIELDS), n))  # (F n): this rank's queries filled
        self.engine.eval()
        with torch.no_grad():
            for s in range(0, len(mine), t.micro_batch):
                sel = mine[s:s + t.micro_batch]
                cand = q.collect(q.request(sel, self.embed))
                out = self.engine(*self.tensors(sel, cand, q))
                for k in REALM_SUMS:
                    sums[k] += float(out[k])
                rows = {k: v.float().cpu().numpy() for k, v in out["rows"].items()}
                rows["gold_known"] = (self.val_gold[sel] >= 0).astype(np.float64)
                rows["gold_hit"] = gold_hits(cand[0], self.val_gold[sel])
                for f, name in enumerate(ROW_FIELDS):
                    table[f, sel] = rows[name]
        self.engine.train()
        tot = dict(zip(REALM_SUMS, allreduce_sum([sums[k] for k in REALM_SUMS])))
        table = np.asarray(allreduce_sum(table.reshape(-1).tolist())).reshape(len(ROW_FIELDS), n)
        out = realm_rates(tot, "val_")
        out["val_loss"] = tot["nll_marginal"] / max(tot["masked"], 1.0)  # -log p(y|x), either objective
        out["val_queries"] = int(tot["queries"])
        out["val_masked_tokens"] = int(tot["masked"])
        out.update(summarize(dict(zip(ROW_FIELDS, table)), self.val_cluster, self.val_scored,
                             self.mcfg.k - 1))
        if self.rank == 0:  # per query, for paired comparisons across runs (ratray/realm/compare.py)
            save_rows(self.run_dir / "heldout_rows.npz", dict(zip(ROW_FIELDS, table)),
                      q.queries.block_ids, self.val_cluster, self.val_scored)
        return out

    def client_state(self, metrics: dict) -> dict:
        return {"refresh": self.status if self.rank == 0 else None,
                "index_version": metrics.get("index_version")}

    def progress_line(self, step: int, m: dict) -> str:
        parts = [f"step {step}/{self.t.steps}", f"loss {m['loss']:.4f}" if "loss" in m else "",
                 f"acc ret {m['acc_retrieval']:.3f} / null {m['acc_null']:.3f}" if "acc_retrieval" in m else "",
                 f"index v{int(m['index_version'])}" if "index_version" in m else "",
                 f"stale {int(m['staleness_steps'])} steps" if "staleness_steps" in m else "",
                 f"wait {m['retrieval_wait_ms']:.1f} ms" if "retrieval_wait_ms" in m else ""]
        if "val_acc_retrieval" in m:
            parts.append(f"val acc ret {m['val_acc_retrieval']:.4f} / null {m['val_acc_null']:.4f}")
        if "val_exact_retrieval" in m:
            parts.append(f"val exact ret {m['val_exact_retrieval']:.4f} / null {m['val_exact_null']:.4f}"
                         f" | p(∅) {m['val_p_null_mean']:.3f}")
        return "[ratray] " + " | ".join(p for p in parts if p)

    def plots(self, out):
        from ratray.tracking import plot_curves

        return [plot_curves({"with retrieval": [tuple(x) for x in self.history["acc_retrieval"]],
                             "null document only": [tuple(x) for x in self.history["acc_null"]]},
                            out / "masked_accuracy.png", ylabel="masked-token accuracy (train)",
                            title=f"{self.t.run_name}: REALM masked-token accuracy")]


def train_loop(config: dict) -> None:
    """Ray Train entry (`TorchTrainer(train_loop, train_loop_config=config)`)."""
    RealmWorker(config).run()

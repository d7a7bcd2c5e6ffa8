"""The REALM Ray Train worker loop: DeepSpeed engine, prefetched retrieval, index refreshes.

    per step:  embed batch t+1's queries with the current query tower (no grad) ─► search_async ─┐
               forward/backward/step on batch t: p(z|x) rescored by both towers, reader, MLM  │ overlap
               batch t+1's candidates: drop the source document, take k-1 ◄──────────────────┘
    every refresh.every steps (rank 0): doc tower weights ─► object store ─► RefreshService.request
        (returns at once; the shards keep serving the old version until the swap)

Metrics (rank 0 → MLflow): loss, masked-token accuracy with retrieval and with the null document
only, retrieval utility, p(∅|x), the index version that served the batch, staleness (steps since
the serving index's weights), refresh counts and times.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from ratray.train.loop import CKPT_TAG, _allreduce_sum, _finish, _world, save_and_report

STAT_KEYS = ("correct_retrieval", "correct_null", "masked", "queries", "utility", "p_null", "nll_null")
CANDIDATE_MARGIN = 8  # extra candidates asked for, so the source-document filter rarely runs short


def _rates(s: dict, prefix: str = "") -> dict:
    m, q = max(s["masked"], 1.0), max(s["queries"], 1.0)
    return {f"{prefix}acc_retrieval": s["correct_retrieval"] / m, f"{prefix}acc_null": s["correct_null"] / m,
            f"{prefix}retrieval_utility": s["utility"] / q, f"{prefix}p_null": s["p_null"] / q,
            f"{prefix}nll_null_per_token": s["nll_null"] / m}


class Candidates:
    """Retrieval for batches of masked queries: async search, source-document filter, block tokens."""

    def __init__(self, store, index, queries, k: int, block_tokens: int):
        from ratray.retrieval.neighbours import DocCodes

        self.store, self.index, self.queries, self.k1, self.t = store, index, queries, k - 1, block_tokens
        self.docs = DocCodes(store)
        self.K = min(index.ntotal, self.k1 + CANDIDATE_MARGIN)
        self.wait_s, self.requests, self.versions = 0.0, 0, []

    def request(self, sel: np.ndarray, embed) -> tuple:
        """sel: rows of `queries`; embed: ids (b q) -> (b p) numpy (the current query tower)."""
        e = embed(self.queries.ids[sel])
        return sel, e, self.index.search_async(e, self.K)

    def collect(self, pending: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """-> candidate block ids (b k-1, -1 = missing), tokens (b k-1 t), valid (b k-1), version."""
        from ratray.retrieval.neighbours import search_filtered

        sel, e, fut = pending
        t0 = time.perf_counter()
        first = fut.result()
        self.wait_s += time.perf_counter() - t0
        self.requests += 1
        self.versions.append(first.version)
        src = self.docs.of(self.queries.block_ids[sel])[:, None]  # (b 1): the source document
        ids, _ = search_filtered(self.index, e, src, self.docs, self.k1, first=first)
        valid = ids >= 0
        tok = self.store.tokens(np.where(valid, ids, 0).reshape(-1), pad_to=self.t)
        tok = tok.reshape(len(sel), self.k1, self.t)
        tok[~valid] = self.store.tokenizer.pad_id
        return ids, tok, valid, first.version

    def take_stats(self) -> dict:
        out = {"retrieval_wait_ms": 1e3 * self.wait_s / max(1, self.requests)}
        if self.versions:
            out["index_version"] = float(self.versions[-1])
        self.wait_s, self.requests, self.versions = 0.0, 0, []
        return out


def train_loop(config: dict) -> None:
    """Ray Train entry: `config` holds the resolved job config and the paths the driver prepared."""
    import deepspeed
    import ray
    import ray.train
    import torch

    from ratray.config import RealmJobConfig, _build
    from ratray.data.chunks import ChunkStore
    from ratray.data.masking import make_queries
    from ratray.models.realm import Realm, RealmConfig
    from ratray.retrieval.refresh import put_weights
    from ratray.retrieval.service import ShardedIndex
    from ratray.tracking import make_tracker, plot_curves
    from ratray.train.batches import SequenceSampler
    from ratray.train.deepspeed_cfg import deepspeed_config, lr_lambda

    job: RealmJobConfig = _build(RealmJobConfig, config["job"])
    t = job.train
    rank, world = _world()
    device = torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")
    torch.manual_seed(t.seed)

    # data: masked queries from the train / val blocks, candidates from the shard actors
    store = ChunkStore.open(config["store_path"])
    mcfg = RealmConfig(**config["model"])
    mask = job.masking
    train_q = make_queries(store, store.split_ids("train"), mcfg.query_tokens, t.seed, mask.mode, mask.rate)
    val_ids = store.split_ids("val")
    val_ids = val_ids if job.eval_queries == 0 else val_ids[:job.eval_queries]
    val_q = make_queries(store, val_ids, mcfg.query_tokens, t.seed + 1, mask.mode, mask.rate)
    index = ShardedIndex.connect(config["service_name"], namespace=config["namespace"])
    refresh = ray.get_actor(f"{config['service_name']}-refresh", namespace=config["namespace"]) \
        if rank == 0 else None
    train_c = Candidates(store, index, train_q, mcfg.k, mcfg.block_tokens)
    val_c = Candidates(store, index, val_q, mcfg.k, mcfg.block_tokens)
    sampler = SequenceSampler(len(train_q), t.seed)

    # model (all three encoders from the pretrained sentence-BERT) + DeepSpeed engine
    model = Realm.from_pretrained(mcfg, config["weights"])
    groups = []  # (towers | reader) x (decay | no decay); LambdaLR scales each group's own lr
    for towers in (True, False):
        for decay in (True, False):
            ps = [p for n, p in model.named_parameters()
                  if ("_tower." in n) == towers and (p.dim() >= 2) == decay]
            groups.append({"params": ps, "weight_decay": t.weight_decay if decay else 0.0,
                           "lr": t.lr * (job.tower_lr_scale if towers else 1.0)})
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=deepspeed_config(t, world))
    net = engine.module

    def gathered(module):  # ZeRO-3 partitions parameters: gather them (a collective: all ranks)
        if t.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(module.parameters()))
        return contextlib.nullcontext()

    def embed(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad(), gathered(net.query_tower):
            return net.embed_queries(torch.from_numpy(ids.astype(np.int64)).to(device)).float().cpu().numpy()

    def tensors(sel, cand, q: "Candidates"):
        _, tok, valid, version = cand
        as_t = lambda a: torch.from_numpy(np.asarray(a)).to(device)  # noqa: E731
        return (as_t(q.queries.ids[sel].astype(np.int64)), as_t(q.queries.labels[sel]),
                as_t(tok.astype(np.int64)), as_t(valid)), version

    def request_refresh(step: int) -> None:
        with gathered(net.doc_tower):
            if rank == 0:
                weights = {k: v.float() for k, v in net.doc_state_dict().items()}
                refresh.request.remote(put_weights(weights), step)  # fire and forget

    # resume: weights, optimizer, schedule, step, history, and the index version of the checkpoint
    start, history = 0, {"train_loss": [], "acc_retrieval": [], "acc_null": [], "index_version": []}
    ckpt = ray.train.get_checkpoint()
    restored = None
    if ckpt:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
        start, history = client["step"], client["history"]
        missing = 0.0
        if rank == 0 and client.get("refresh"):
            restored = ray.get(refresh.restore.remote(client["refresh"]))
            missing = 0.0 if restored["available"] else 1.0
        if _allreduce_sum([missing])[0] > 0:  # that version's files are gone: rebuild from these
            request_refresh(start)            # weights (every rank: ZeRO-3 gathers collectively)
    tracker = make_tracker(rank, workdir=job.workdir, experiment=job.experiment, run_name=t.run_name,
                           params={**config["job"], "model": config["model"]}, resume=True)
    tracker.set_tags({"ratray.model_type": "realm", "ratray.masking": mask.mode,
                      "ratray.refresh_every": str(job.refresh.every),
                      "ratray.resumed_from_step": str(start),
                      **({"ratray.restored_index_version": str(restored["serving_version"])} if restored else {})})

    def seqs(step: int, micro: int) -> np.ndarray:
        return sampler.for_step(step, micro, rank, t.micro_batch, t.grad_accum, world)

    def evaluate() -> dict:
        n = len(val_q)
        mine = np.arange(n)[rank::world]
        sums = dict.fromkeys(STAT_KEYS, 0.0)
        loss_sum = 0.0
        engine.eval()
        with torch.no_grad():
            for s in range(0, max(len(mine), 1), t.micro_batch):
                sel = mine[s:s + t.micro_batch]
                if len(sel) == 0:
                    break
                (qi, lab, blk, val), _ = tensors(sel, val_c.collect(val_c.request(sel, embed)), val_c)
                out = engine(qi, lab, blk, val)
                loss_sum += float(out["loss"].detach()) * float(out["masked"])
                for k in STAT_KEYS:
                    sums[k] += float(out[k])
        engine.train()
        tot = dict(zip(STAT_KEYS + ("loss_sum",), _allreduce_sum([sums[k] for k in STAT_KEYS] + [loss_sum])))
        out = _rates(tot, "val_")
        out["val_loss"] = tot["loss_sum"] / max(tot["masked"], 1.0)
        out["val_queries"] = int(tot["queries"])
        out["val_masked_tokens"] = int(tot["masked"])
        return out

    def status_metrics(step: int) -> dict:
        if refresh is None:
            return {}, None
        st = ray.get(refresh.status.remote())
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
        return out, st

    def checkpoint_and_report(step_done: int, metrics: dict, st: dict | None) -> None:
        save_and_report(engine, {"step": step_done, "history": history, "refresh": st,
                                 "index_version": metrics.get("index_version")}, metrics)

    # the loop
    sums = dict.fromkeys(STAT_KEYS, 0.0)
    t_last, losses = time.perf_counter(), []
    pending = train_c.request(seqs(start, 0), embed) if start < t.steps else None
    for step in range(start, t.steps):
        for micro in range(t.grad_accum):
            sel = seqs(step, micro)
            (qi, lab, blk, val), _ = tensors(sel, train_c.collect(pending), train_c)
            nxt = (step, micro + 1) if micro + 1 < t.grad_accum else (step + 1, 0)
            pending = train_c.request(seqs(*nxt), embed) if nxt[0] < t.steps else None  # in flight
            out = engine(qi, lab, blk, val)
            engine.backward(out["loss"])
            engine.step()
            losses.append(float(out["loss"].detach()))
            for k in STAT_KEYS:
                sums[k] += float(out[k])
        done = step + 1
        if job.refresh.every and done % job.refresh.every == 0 and done < t.steps:
            request_refresh(done)
        history["train_loss"].append([done, losses[-1]])
        last = done == t.steps
        if done % t.log_every == 0 or last or done % t.checkpoint_every == 0:
            dt = time.perf_counter() - t_last
            n_steps = len(losses) / t.grad_accum
            tot = dict(zip(STAT_KEYS, _allreduce_sum([sums[k] for k in STAT_KEYS])))
            lrs = sched.get_last_lr()  # groups: towers (decay, no decay), reader (decay, no decay)
            metrics = {"step": done, "loss": float(np.mean(losses)), "lr": lrs[2], "lr_towers": lrs[0],
                       "queries_per_s": t.micro_batch * t.grad_accum * world * n_steps / max(dt, 1e-9),
                       "step_time_s": dt / max(n_steps, 1), **_rates(tot), **train_c.take_stats()}
            if rank == 0:
                extra, st = status_metrics(done)
                metrics.update(extra)
                if restored:
                    metrics["index_version_restored"] = float(restored["serving_version"])
            else:
                st = None
            if last or (t.eval_every and done % t.eval_every == 0):
                metrics.update(evaluate())
            for key in ("acc_retrieval", "acc_null", "index_version"):
                if key in metrics:
                    history[key].append([done, metrics[key]])
            if last:
                history["final"] = dict(metrics)
            tracker.log_metrics(metrics, step=done)
            if rank == 0:
                print(_progress_line(done, t.steps, metrics), flush=True)
            if last or done % t.checkpoint_every == 0:
                if last and rank == 0:
                    _finish(tracker, history, config, metrics, plot_curves)
                    _plots(tracker, history, config, plot_curves)
                checkpoint_and_report(done, metrics, st)
            else:
                ray.train.report(metrics)
            t_last, losses, sums = time.perf_counter(), [], dict.fromkeys(STAT_KEYS, 0.0)
    if start >= t.steps:  # relaunched after the run had finished: evaluate and report again
        metrics = {"step": start, **evaluate()}
        st = None
        if rank == 0:
            extra, st = status_metrics(start)
            metrics.update(extra)
            if restored:
                metrics["index_version_restored"] = float(restored["serving_version"])
            _finish(tracker, history, config, metrics, plot_curves)
        checkpoint_and_report(start, metrics, st)
    tracker.end("FINISHED")


def _progress_line(step: int, steps: int, m: dict) -> str:
    parts = [f"step {step}/{steps}", f"loss {m['loss']:.4f}" if "loss" in m else "",
             f"acc ret {m['acc_retrieval']:.3f} / null {m['acc_null']:.3f}" if "acc_retrieval" in m else "",
             f"index v{int(m['index_version'])}" if "index_version" in m else "",
             f"stale {int(m['staleness_steps'])} steps" if "staleness_steps" in m else "",
             f"wait {m['retrieval_wait_ms']:.1f} ms" if "retrieval_wait_ms" in m else ""]
    if "val_acc_retrieval" in m:
        parts.append(f"val acc ret {m['val_acc_retrieval']:.4f} / null {m['val_acc_null']:.4f}")
    return "[ratray] " + " | ".join(p for p in parts if p)


def _plots(tracker, history: dict, config: dict, plot_curves) -> None:
    from pathlib import Path

    out = Path(config["run_dir"])
    png = plot_curves({"with retrieval": [tuple(x) for x in history["acc_retrieval"]],
                       "null document only": [tuple(x) for x in history["acc_null"]]},
                      out / "masked_accuracy.png", ylabel="masked-token accuracy (train)",
                      title=f"{config['job']['train']['run_name']}: REALM masked-token accuracy")
    tracker.log_artifact(str(png))

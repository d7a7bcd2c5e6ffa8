"""The Ray Train worker loop: DeepSpeed engine, async retrieval, checkpoints, MLflow on rank 0.

Runs inside every Ray Train worker (`TorchTrainer(train_loop, ...)`). Ray Train has set up the
process group (gloo on CPU, NCCL on GPU) and the rank variables; `deepspeed.initialize` reuses it.

    per step:  request neighbours of batch t+1 (async, shard actors)  ─┐
               forward/backward/step on batch t (DeepSpeed, ZeRO)      │ overlap
               wait for batch t+1's neighbours  ◄──────────────────────┘
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

CKPT_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray Train checkpoint folder


def make_trainer(train_fn, loop_config: dict, t, workdir: str):
    """The Ray Train `TorchTrainer` of a run: `t.num_workers` workers, resumable by `t.run_name`
    (same storage path + name = resume), `t.max_failures` retries, `t.keep_checkpoints` kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = t.storage_path or str((Path(workdir) / "ray_results").resolve())
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=t.run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints)),
    )


def write_summary(job, run_dir: Path, result, timings: dict, head: dict, tail: dict) -> dict:
    """`run_dir/summary.json` of a finished run (driver side): the job's own `head` fields, what
    every run reports (wall time, timings, checkpoint, MLflow record, run folder), then `tail`;
    also attached to the run's MLflow record. Returns the summary."""
    from mlflow import MlflowClient

    from ratray.tracking import tracking_uri

    run_id = (result.metrics or {}).get("mlflow_run_id")
    summary = {
        **head,
        "wall_time_s": round(timings["total_s"], 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "mlflow": {"tracking_uri": tracking_uri(job.workdir), "experiment": job.experiment,
                   "run_id": run_id},
        "run_dir": str(run_dir.resolve()),
        **tail,
    }
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    if run_id:
        MlflowClient(tracking_uri(job.workdir)).log_artifact(run_id, str(path))
    return summary


def save_and_report(engine, client_state: dict, metrics: dict) -> None:
    """Every rank: DeepSpeed checkpoint (with our client state) into one folder, barrier, then
    `ray.train.report` with that folder as the Ray Train checkpoint."""
    import ray.train
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state=client_state)
        if dist.is_initialized():
            dist.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _world():
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _allreduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class _Retrieval:
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
        n = max(1, self.requests)
        out = {"retrieval_wait_ms": 1e3 * self.wait_s / n, "retrieval_inflight_ms": 1e3 * self.latency_s / n}
        self.wait_s = self.latency_s = 0.0
        self.requests = 0
        return out if self.mode == "online" else {}


def evaluate_bpb(engine, batches, nbr_ids: np.ndarray | None, seq_idx: np.ndarray, micro_batch: int,
                 device) -> dict:
    """Validation bits-per-byte summed over this rank's sequences, all-reduced across ranks.

    `nbr_ids` None = retrieval off (RETRO[OFF] / baseline). Exact: nats of every non-pad target
    over the exact UTF-8 bytes those targets stand for.
    """
    import torch
    import torch.nn.functional as F

    nats, nbytes, ntok = 0.0, 0, 0
    engine.eval()
    with torch.no_grad():
        for s in range(0, len(seq_idx), micro_batch):
            sel = seq_idx[s: s + micro_batch]
            idx, tgt = batches.inputs_targets(sel)
            nb = None if nbr_ids is None else torch.from_numpy(batches.neighbours(nbr_ids[sel])).to(device)
            logits, _ = engine(torch.from_numpy(idx).to(device), nb)
            t = torch.from_numpy(tgt).to(device)
            mask = t != batches.pad
            nll = F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), reduction="none")
            nats += float(nll[mask.flatten()].sum())
            nbytes += batches.target_bytes(tgt)
            ntok += int(mask.sum())
    engine.train()
    nats, nbytes, ntok = _allreduce_sum([nats, nbytes, ntok])
    return {"bpb": nats / math.log(2) / max(1.0, nbytes), "nats_per_token": nats / max(1.0, ntok),
            "tokens": int(ntok), "bytes": int(nbytes)}


def train_loop(config: dict) -> None:
    """Ray Train entry: `config` holds the resolved job config and the paths the driver prepared."""
    import deepspeed
    import ray.train
    import torch

    from ratray.config import RetroJobConfig, TrainConfig, _build
    from ratray.data.chunks import ChunkStore
    from ratray.models.retro import Retro, RetroConfig
    from ratray.retrieval.neighbours import ChunkVectors, NeighbourFetcher, sequence_layout
    from ratray.retrieval.service import ShardedIndex
    from ratray.tracking import make_tracker, plot_curves
    from ratray.train.batches import RetroBatches, SequenceSampler
    from ratray.train.deepspeed_cfg import deepspeed_config, lr_lambda

    job: RetroJobConfig = _build(RetroJobConfig, config["job"])
    t: TrainConfig = job.train
    rank, world = _world()
    device = torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")
    torch.manual_seed(t.seed)

    # data: sequences of chunk slots, neighbours (precomputed table or online fetcher)
    store = ChunkStore.open(config["store_path"])
    mcfg = RetroConfig(**config["model"])
    l = mcfg.seq_len // mcfg.chunk_size
    train = RetroBatches(store, sequence_layout(store, "train", l), mcfg.k)
    val = RetroBatches(store, sequence_layout(store, "val", l), mcfg.k)
    retro = mcfg.model == "retro"
    fetcher = None
    if retro and t.retrieval == "online":
        index = ShardedIndex.connect(config["service_name"], namespace=config["namespace"])
        fetcher = NeighbourFetcher(store, index, train.layout, mcfg.k, ChunkVectors(config["vectors_path"]))
    table = np.load(config["train_neighbours"]) if retro and t.retrieval == "precomputed" else None
    val_nbrs = np.load(config["val_neighbours"]) if retro else None
    retrieval = _Retrieval(t.retrieval, table, fetcher)
    sampler = SequenceSampler(len(train), t.seed)

    # model + DeepSpeed engine (torch AdamW + warmup/cosine: no JIT-built DeepSpeed optimizer op)
    model = Retro(mcfg)
    opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=deepspeed_config(t, world))

    # resume: weights, optimizer, schedule and our client state (step, history) from the checkpoint
    start, history = 0, {"train_loss": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
        start, history = client["step"], client["history"]
    tracker = make_tracker(rank, workdir=job.workdir, experiment=job.experiment, run_name=t.run_name,
                           params={**config["job"], "model": config["model"]}, resume=True)
    tracker.set_tags({"ratray.model_type": mcfg.model, "ratray.retrieval": t.retrieval,
                      "ratray.resumed_from_step": str(start)})

    def seqs(step: int, micro: int) -> np.ndarray:
        return sampler.for_step(step, micro, rank, t.micro_batch, t.grad_accum, world)

    def eval_all() -> dict:
        n = len(val) if t.eval_sequences == 0 else min(t.eval_sequences, len(val))
        mine = np.arange(n)[rank::world]
        out = {}
        if retro:
            on = evaluate_bpb(engine, val, val_nbrs, mine, t.micro_batch, device)
            out["val_bpb_retro_on"] = on["bpb"]
        off = evaluate_bpb(engine, val, None, mine, t.micro_batch, device)
        out["val_bpb_retro_off" if retro else "val_bpb"] = off["bpb"]
        out["val_tokens"], out["val_bytes"] = off["tokens"], off["bytes"]
        return out

    def checkpoint_and_report(step_done: int, metrics: dict) -> None:
        save_and_report(engine, {"step": step_done, "history": history}, metrics)

    # the loop
    tokens_per_step = t.micro_batch * t.grad_accum * world * mcfg.seq_len
    t_last, losses = time.perf_counter(), []
    if retro:
        retrieval.prefetch((start, 0), seqs(start, 0))
    for step in range(start, t.steps):
        for micro in range(t.grad_accum):
            sel = seqs(step, micro)
            nbr = retrieval.get((step, micro), sel) if retro else None
            nxt = (step, micro + 1) if micro + 1 < t.grad_accum else (step + 1, 0)
            if retro and nxt[0] < t.steps:
                retrieval.prefetch(nxt, seqs(*nxt))  # in flight while we compute
            idx, tgt = train.inputs_targets(sel)
            nb = None if nbr is None else torch.from_numpy(train.neighbours(nbr)).to(device)
            _, loss = engine(torch.from_numpy(idx).to(device), nb, torch.from_numpy(tgt).to(device))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        done = step + 1
        history["train_loss"].append([done, losses[-1]])
        last = done == t.steps
        if done % t.log_every == 0 or last or done % t.checkpoint_every == 0:
            dt = time.perf_counter() - t_last
            n_steps = len(losses) / t.grad_accum
            metrics = {"step": done, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                       "tokens_per_s": tokens_per_step * n_steps / max(dt, 1e-9),
                       "step_time_s": dt / max(n_steps, 1), **retrieval.take_stats()}
            if t.eval_every and done % t.eval_every == 0 and not last:
                metrics.update(eval_all())
            if last:
                metrics.update(eval_all())
                history["final"] = {k: v for k, v in metrics.items()}
            tracker.log_metrics(metrics, step=done)
            if rank == 0:
                print(_progress_line(done, t.steps, metrics), flush=True)
            if last or done % t.checkpoint_every == 0:
                if last and rank == 0:
                    _finish(tracker, history, config, metrics, plot_curves)
                checkpoint_and_report(done, metrics)
            else:
                ray.train.report(metrics)
            t_last, losses = time.perf_counter(), []
    if start >= t.steps:  # relaunched after the run had finished: evaluate and report again
        metrics = {"step": start, **eval_all()}
        if rank == 0:
            _finish(tracker, history, config, metrics, plot_curves)
        checkpoint_and_report(start, metrics)
    tracker.end("FINISHED")


def _progress_line(step: int, steps: int, m: dict) -> str:
    parts = [f"step {step}/{steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"{m['tokens_per_s']:.0f} tok/s"]
    if "retrieval_wait_ms" in m:
        parts.append(f"retrieval wait {m['retrieval_wait_ms']:.1f} ms (in flight {m['retrieval_inflight_ms']:.1f} ms)")
    for key in ("val_bpb_retro_on", "val_bpb_retro_off", "val_bpb"):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    return "[ratray] " + " | ".join(parts)


def _finish(tracker, history: dict, config: dict, metrics: dict, plot_curves) -> None:
    """Rank 0 at the end: the loss plot and the resolved config as MLflow artifacts."""
    out = Path(config["run_dir"])
    out.mkdir(parents=True, exist_ok=True)
    png = plot_curves({"train loss": [tuple(x) for x in history["train_loss"]]}, out / "loss.png",
                      title=f"{config['job']['train']['run_name']}: training loss")
    (out / "config.json").write_text(json.dumps({"job": config["job"], "model": config["model"]}, indent=2))
    (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    for p in (png, out / "config.json", out / "final_metrics.json"):
        tracker.log_artifact(str(p))
    metrics["mlflow_run_id"] = tracker.run_id

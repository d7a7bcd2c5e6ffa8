"""The one Ray Train worker skeleton every method shares; a method (RETRO, REALM) fills in the hooks.

Runs inside every Ray Train worker (`TorchTrainer(method.train_loop, ...)`). Ray Train has set up
the process group (gloo on CPU, NCCL on GPU) and the rank variables; `deepspeed.initialize` reuses
it. Reads top to bottom in `run()`:

    setup()                       the method's data and retrieval clients
    model + optimizer groups      the method's model knows its AdamW groups
    deepspeed.initialize          torch AdamW + warmup/cosine (no JIT-compiled DeepSpeed op)
    resume                        weights, optimizer, schedule, step, history, the method's state
    MLflow (rank 0)               the run (resumed by name), its dataset (the chunk store: name, digest,
                                  counts), system metrics every SYSTEM_METRICS_S seconds
    for step, micro-step:         loss = method.micro_step(step, micro)   (it prefetches the next
                                  batch's retrieval while this one computes) → backward → step
        after_step(done)          e.g. REALM's refresh request
        every log / eval / checkpoint interval: metrics (common + the method's) → MLflow on rank 0
            (loss and bpb also under headline/, the UI's first charts: ratray/mlflow_view.py),
            a progress line, then a checkpoint with `ray.train.report`, or the report alone
    a finished run relaunched:    evaluate and report again

Checkpoints: every rank saves its DeepSpeed shard into one folder (tag `CKPT_TAG`) with the client
state {step, history, the method's state} and a manifest of its files (checkpoint.py); resuming at
step t resumes the data position exactly (the sampler is a function of the step). A resume reads a
private copy of the checkpoint, and only after `checkpoint.verify` has checked it: digests, the
same world size / micro-batch / model config, and pickles that hold only tensors and state.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ratray.train.checkpoint import CKPT_TAG, run_meta, seal, verify

SYSTEM_METRICS_S = 10.0  # rank 0 samples CPU, memory, disk and network into MLflow this often


def quiet_libraries() -> None:
    """What the workers' console shows is the progress line: library chatter goes to the log files
    only (Ray Train's per-report INFO line, logged under its file path and so past its own
    LoggingConfig; faiss's loader trying each instruction set; a DeepSpeed call to a deprecated
    torch collective)."""
    import logging
    import warnings

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray Train layout: only more console lines
        pass
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def world() -> tuple[int, int]:
    """(rank, world size) of this Ray Train worker."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def allreduce_sum(values: list[float]) -> list[float]:
    """Sum `values` over every rank (float64); the identity without a process group."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def save_and_report(engine, client_state: dict, metrics: dict, rank: int, meta: dict) -> None:
    """Every rank: DeepSpeed checkpoint (with our client state) and its manifest into one folder,
    barrier, then `ray.train.report` with that folder as the Ray Train checkpoint."""
    import ray.train
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state=client_state)
        seal(d, rank, meta)
        if dist.is_initialized():
            dist.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class TrainWorker:
    """The skeleton. Subclasses set `job_cls` and fill in the hooks below `run()`."""

    job_cls: type  # the method's job config class (rebuilt here from the driver's dict)
    history_keys: tuple[str, ...] = ()  # metrics kept in the checkpointed history (plots)

    def __init__(self, config: dict):
        import torch

        from ratray.config import from_dict

        quiet_libraries()
        self.config = config  # the resolved job config and the paths the driver prepared
        self.job = from_dict(self.job_cls, config["job"])
        self.t = self.job.train
        self.rank, self.world = world()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.t.use_gpu \
            else torch.device("cpu")
        self.run_dir = Path(config["run_dir"])
        torch.manual_seed(self.t.seed)
        self.history: dict = {"train_loss": [], **{k: [] for k in self.history_keys}}
        self.meta = run_meta(self.world, self.t.micro_batch, self.t.grad_accum, config["model"])

    def next_micro(self, step: int, micro: int) -> tuple[int, int]:
        """The (step, micro-step) after this one: the batch to prefetch retrieval for."""
        return (step, micro + 1) if micro + 1 < self.t.grad_accum else (step + 1, 0)

    def batch_rows(self, step: int, micro: int) -> np.ndarray:
        """The examples (sequences, queries) this rank reads at (step, micro-step)."""
        t = self.t
        return self.sampler.for_step(step, micro, self.rank, t.micro_batch, t.grad_accum, self.world)

    def run(self) -> None:
        import deepspeed
        import ray.train
        import torch

        from ratray.mlflow_view import headline, store_dataset
        from ratray.tracking import make_tracker
        from ratray.train.deepspeed_cfg import deepspeed_config, lr_lambda
        from ratray.train.sampler import SequenceSampler

        t = self.t
        self.setup()
        self.sampler = SequenceSampler(self.n_examples(), t.seed)
        model, groups = self.build_model()
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(t, self.world))

        # resume: weights, optimizer, schedule and our client state from the checkpoint, read
        # from a private copy (nothing can swap a file between the check and DeepSpeed's load)
        start = 0
        ckpt = ray.train.get_checkpoint()
        if ckpt:
            with tempfile.TemporaryDirectory(prefix="ratray-resume-") as d:
                ckpt.to_directory(d)
                verify(d, self.meta)
                _, client = self.engine.load_checkpoint(d, tag=CKPT_TAG)
            start, self.history = client["step"], client["history"]
            self.resume(client)
        self.tracker = make_tracker(self.rank, workdir=self.job.workdir, experiment=self.job.experiment,
                                    run_name=t.run_name, resume=True, system_metrics=SYSTEM_METRICS_S,
                                    params={**self.config["job"], "model": self.config["model"]})
        self.tracker.set_tags({**self.tags(), "ratray.resumed_from_step": str(start)})
        if self.tracker.enabled:  # rank 0: the corpus the run reads, as the run's dataset
            self.tracker.log_dataset(**store_dataset(self.config["store_path"]))

        # the loop
        t_last, losses = time.perf_counter(), []
        if start < t.steps:
            self.start(start)
        for step in range(start, t.steps):
            for micro in range(t.grad_accum):
                loss = self.micro_step(step, micro)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(float(loss.detach()))
            done = step + 1
            self.after_step(done)
            self.history["train_loss"].append([done, losses[-1]])
            last = done == t.steps
            ckpt_due = last or done % t.checkpoint_every == 0
            eval_due = last or bool(t.eval_every and done % t.eval_every == 0)
            if not (done % t.log_every == 0 or ckpt_due or eval_due):
                continue
            dt = time.perf_counter() - t_last
            n_steps = len(losses) / t.grad_accum
            metrics = {"step": done, "loss": float(np.mean(losses)),
                       **self.lr_metrics(self.sched.get_last_lr()),
                       **self.interval_metrics(n_steps, dt), "step_time_s": dt / max(n_steps, 1)}
            metrics.update(self.status_metrics(done))
            if eval_due:
                metrics.update(self.evaluate())
            for key in self.history_keys:
                if key in metrics:
                    self.history[key].append([done, metrics[key]])
            if last:
                self.history["final"] = dict(metrics)
            self.tracker.log_metrics({**metrics, **headline(metrics)}, step=done)
            if self.rank == 0:  # write(): Ray Train's patched print() would log it twice
                sys.stdout.write(self.progress_line(done, metrics) + "\n")
                sys.stdout.flush()
            if ckpt_due:
                if last and self.rank == 0:
                    self.finish(metrics)
                self.checkpoint(done, metrics)
            else:
                ray.train.report(metrics)
            t_last, losses = time.perf_counter(), []
        if start >= t.steps:  # relaunched after the run had finished: evaluate and report again
            metrics = {"step": start, **self.evaluate(), **self.status_metrics(start)}
            if self.rank == 0:
                self.finish(metrics)
            self.checkpoint(start, metrics)
        self.tracker.end("FINISHED")

    def checkpoint(self, step_done: int, metrics: dict) -> None:
        save_and_report(self.engine, {"step": step_done, "history": self.history,
                                      **self.client_state(metrics)}, metrics, self.rank, self.meta)

    def finish(self, metrics: dict) -> None:
        """Rank 0 at the end: the loss plot, the method's plots, the resolved config and the final
        metrics as MLflow artifacts; the MLflow run id goes into the metrics (the driver reads it)."""
        from ratray.tracking import plot_curves

        out = self.run_dir
        out.mkdir(parents=True, exist_ok=True)
        files = [plot_curves({"train loss": [tuple(x) for x in self.history["train_loss"]]},
                             out / "loss.png", title=f"{self.t.run_name}: training loss")]
        files += self.plots(out)
        (out / "config.json").write_text(json.dumps({"job": self.config["job"],
                                                     "model": self.config["model"]}, indent=2))
        (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
        for p in (*files, out / "config.json", out / "final_metrics.json"):
            self.tracker.log_artifact(str(p))
        metrics["mlflow_run_id"] = self.tracker.run_id

    # -- hooks ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Open the data and connect the retrieval clients (before the model is built)."""
        raise NotImplementedError

    def n_examples(self) -> int:
        """Training examples the sampler permutes (sequences, queries)."""
        raise NotImplementedError

    def build_model(self):
        """(model, AdamW parameter groups)."""
        raise NotImplementedError

    def resume(self, client: dict) -> None:
        """Every rank, after the checkpoint is loaded: restore the method's own state."""

    def tags(self) -> dict:
        return {}

    def start(self, step: int) -> None:
        """Before the first micro-step: put the first batch's retrieval in flight."""

    def micro_step(self, step: int, micro: int):
        """The loss (a scalar tensor) of this rank's micro-batch; prefetch the next batch."""
        raise NotImplementedError

    def after_step(self, done: int) -> None:
        """After optimizer step `done` (every rank)."""

    def lr_metrics(self, lrs: list[float]) -> dict:
        return {"lr": lrs[0]}

    def interval_metrics(self, n_steps: float, seconds: float) -> dict:
        """Throughput and training statistics of the interval just ended (all-reduce here)."""
        return {}

    def status_metrics(self, step: int) -> dict:
        """Rank 0's view of services (e.g. REALM's refresh); {} elsewhere."""
        return {}

    def evaluate(self) -> dict:
        """Held-out metrics (every rank takes part; values all-reduced)."""
        raise NotImplementedError

    def client_state(self, metrics: dict) -> dict:
        """Extra state stored in the checkpoint beside step and history."""
        return {}

    def progress_line(self, step: int, metrics: dict) -> str:
        return f"[ratray] step {step}/{self.t.steps} | loss {metrics['loss']:.4f}"

    def plots(self, out: Path) -> list[Path]:
        """The method's plots for the end of the run (rank 0)."""
        return []

"""GPU check: the GPU paths on a machine with a GPU, in well under 5 minutes.

    python bench/gpu_check.py                 # defaults sized for one data-centre GPU (~1-2 min)
    python bench/gpu_check.py --quick         # small sizes: a smoke test in ~30 s
    python bench/gpu_check.py --json out.json # also write the results as JSON

1. FAISS: a flat index (exact) and an IVF index built on the CPU, copied to GPU 0 with
   `ratray.index.gpu.GpuIndex`. The GPU answers must match the CPU answers: the flat top-k
   row by row (ids equal, or distances tied within float tolerance), the exactly re-scored
   top-k of `ratray.index.search.search_topk` id for id, and the IVF top-k with >= 0.99
   overlap (same nprobe; GPU and CPU IVF differ only in float summation order). Searches from
   several threads at once go through the index lock and must equal the serial answers.
   Prints CPU vs GPU queries/s.
2. Training: a few RETRO optimizer steps on CUDA through DeepSpeed (NCCL process group of one
   rank, ZeRO stage 2, bf16, the project's generated DeepSpeed config and torch AdamW), then the
   same in fp32; the loss must stay finite. Prints tokens/s for both.

Exit status: 0 when every check passed, or when there is no GPU at all (the reason is printed:
no CUDA device, CPU-only torch, or CPU-only faiss); 1 when a check failed, or when one half of
the GPU stack is missing on a machine that has a GPU (e.g. faiss-cpu installed next to CUDA
torch: install the project's `gpu` extra).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ratray.index.gpu import (GpuIndex, faiss_has_gpu, gpu_count, torch_cuda_count,  # noqa: E402
                                  torch_gpu_build)


@dataclass
class Report:
    checks: list[dict] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


def no_gpu_reason() -> str | None:
    """Why this machine has no usable GPU at all, or None when torch or FAISS sees one."""
    if torch_cuda_count() > 0 or gpu_count() > 0:
        return None
    if not torch_gpu_build() and not faiss_has_gpu():
        return "CPU-only torch and CPU-only faiss are installed (and no CUDA device is visible)"
    return "no CUDA device is visible to this process"


# ---------------------------------------------------------------------------------------------
# FAISS: GPU index vs CPU index


def compare_topk(D_ref: np.ndarray, I_ref: np.ndarray, D: np.ndarray, I: np.ndarray,
                 rtol: float = 1e-4, atol: float = 1e-4) -> dict:
    """Row-by-row agreement of two top-k answers over the same database.

    A row agrees when its ids are equal, or when the distances agree within tolerance and the
    ids differ only inside groups of (near-)tied distances. Returns counts and the first
    disagreeing row."""
    assert D_ref.shape == D.shape == I_ref.shape == I.shape, (D_ref.shape, D.shape)
    exact = (I_ref == I).all(axis=1)
    close = np.isclose(D_ref, D, rtol=rtol, atol=atol).all(axis=1)
    tie_ok = np.zeros(len(I), bool)
    for r in np.flatnonzero(~exact & close):
        # ids may swap only among equal distances: compare the id sets per distance group,
        # allowing the group at the k-th place to be cut differently
        kth = D_ref[r, -1]
        inner_ref = set(I_ref[r][~np.isclose(D_ref[r], kth, rtol=rtol, atol=atol)].tolist())
        inner = set(I[r][~np.isclose(D[r], kth, rtol=rtol, atol=atol)].tolist())
        tie_ok[r] = inner_ref == inner
    agree = exact | tie_ok
    bad = np.flatnonzero(~agree)
    return {"rows": int(len(I)), "exact_rows": int(exact.sum()), "agree_rows": int(agree.sum()),
            "first_bad_row": int(bad[0]) if len(bad) else None}


def overlap_at_k(I_ref: np.ndarray, I: np.ndarray) -> float:
    """Mean fraction of the reference top-k ids that the other answer also returns."""
    k = I_ref.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(I_ref, I)]))


def _qps(search, xq: np.ndarray, k: int, reps: int) -> float:
    search(xq[:64], k)  # warm-up (GPU kernels, BLAS threads)
    t0 = time.perf_counter()
    for _ in range(reps):
        search(xq, k)
    return reps * len(xq) / (time.perf_counter() - t0)


def concurrent_matches(gidx, xq: np.ndarray, k: int, threads: int = 4) -> bool:
    """Searches from `threads` threads at once (serialised by the index lock) equal serial ones."""
    want = [gidx.search(part, k)[1] for part in np.array_split(xq, threads)]
    got: list = [None] * threads
    errors: list[BaseException] = []

    def run(i: int, part: np.ndarray) -> None:
        try:
            for _ in range(3):
                got[i] = gidx.search(part, k)[1]
        except BaseException as e:  # surfaced below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(np.array_split(xq, threads))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return all(np.array_equal(a, b) for a, b in zip(want, got))


def check_faiss(rep: Report, n: int, dim: int, n_queries: int, k: int, nlist: int, nprobe: int,
                seed: int = 0) -> None:
    import faiss

    from ratray.index.factory import configure_faiss
    from ratray.index.search import enable_reconstruct, search_topk

    configure_faiss(0)
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, dim), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(n, n_queries, replace=False)] + 0.05 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    ids = np.arange(n, dtype=np.int64) * 7 + 3  # chunk ids are not row numbers

    flat = faiss.IndexFlatL2(dim)
    flat.add(xb)
    t0 = time.perf_counter()
    gflat = GpuIndex.from_cpu(flat, 0)
    rep.numbers["flat_copy_to_gpu_s"] = round(time.perf_counter() - t0, 3)
    D_c, I_c = flat.search(xq, k)
    D_g, I_g = gflat.search(xq, k)
    cmp = compare_topk(D_c, I_c, D_g, I_g)
    rep.check("flat: GPU top-k == CPU top-k", cmp["agree_rows"] == cmp["rows"],
              f"{cmp['agree_rows']}/{cmp['rows']} rows agree ({cmp['exact_rows']} identical), "
              f"first bad row {cmp['first_bad_row']}")
    Dc2, Ic2 = search_topk(flat, ids, xq, k, "l2")
    Dg2, Ig2 = search_topk(gflat, ids, xq, k, "l2", vectors=gflat.stored_vectors())
    rep.check("flat: exactly re-scored top-k (search_topk) identical", np.array_equal(Ic2, Ig2),
              f"{int((Ic2 == Ig2).all(axis=1).sum())}/{len(Ic2)} rows identical, "
              f"max |dD| {float(np.abs(Dc2 - Dg2).max()):.2e}")
    rep.check("flat: concurrent GPU searches (index lock) equal serial ones",
              concurrent_matches(gflat, xq, k), "4 threads x 3 searches each")
    reps = 5
    rep.numbers["flat_cpu_qps"] = round(_qps(flat.search, xq, k, reps))
    rep.numbers["flat_gpu_qps"] = round(_qps(gflat.search, xq, k, reps))

    quantizer = faiss.IndexFlatL2(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
    train = xb[rng.choice(n, min(n, 64 * nlist), replace=False)]
    t0 = time.perf_counter()
    ivf.train(train)
    ivf.add(xb)
    rep.numbers["ivf_build_cpu_s"] = round(time.perf_counter() - t0, 2)
    ivf.nprobe = nprobe
    enable_reconstruct(ivf)  # decoding for exact re-scoring stays on the CPU copy
    givf = GpuIndex.from_cpu(ivf, 0)
    faiss.GpuParameterSpace().set_index_parameter(givf.gpu, "nprobe", nprobe)
    _, I_ci = ivf.search(xq, k)
    _, I_gi = givf.search(xq, k)
    ov = overlap_at_k(I_ci, I_gi)
    rep.check(f"IVF{nlist},Flat nprobe {nprobe}: GPU top-k overlaps CPU top-k", ov >= 0.99,
              f"overlap@{k} {ov:.4f} (needs >= 0.99)")
    _, Ir_c = search_topk(ivf, ids, xq, k, "l2")
    _, Ir_g = search_topk(givf, ids, xq, k, "l2", vectors=xb)  # flat storage stands in for decoding
    ov2 = overlap_at_k(Ir_c, Ir_g)
    rep.check("IVF: re-scored top-k overlap", ov2 >= 0.99, f"overlap@{k} {ov2:.4f} (needs >= 0.99)")
    rep.numbers["ivf_cpu_qps"] = round(_qps(ivf.search, xq, k, reps))
    rep.numbers["ivf_gpu_qps"] = round(_qps(givf.search, xq, k, reps))
    for g in (gflat, givf):
        g.release()


# ---------------------------------------------------------------------------------------------
# RETRO training steps on CUDA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def retro_batch(cfg, batch: int, rng: np.random.Generator):
    """Random tokens and neighbours with RETRO's shapes: idx/targets (b, n), neighbours (b, l, k, r)."""
    import torch

    n, l = cfg.seq_len, cfg.seq_len // cfg.chunk_tokens
    tok = rng.integers(1, cfg.vocab_size, size=(batch, n + 1))
    nb = rng.integers(1, cfg.vocab_size, size=(batch, l, cfg.k, cfg.neighbour_len))
    return (torch.from_numpy(tok[:, :-1]), torch.from_numpy(nb), torch.from_numpy(tok[:, 1:]))


def train_steps(cfg, device: str, steps: int, micro_batch: int, precision: str,
                use_deepspeed: bool, zero_stage: int = 2, seed: int = 0) -> dict:
    """`steps` optimizer steps of RETRO on `device`; returns losses, tokens/s and the step time.

    With DeepSpeed: the project's `deepspeed_config` (ZeRO stage, bf16/fp32) and a torch AdamW,
    exactly as `ratray.train.worker` builds its engine; the process group (NCCL on CUDA, gloo on
    CPU) must already be initialised. Without: plain torch with autocast for bf16."""
    import torch

    from ratray.config import TrainConfig
    from ratray.retro.model import Retro
    from ratray.train.deepspeed_cfg import deepspeed_config, lr_lambda

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t = TrainConfig(steps=max(steps, 1), micro_batch=micro_batch, precision=precision,
                    zero_stage=zero_stage, warmup_steps=0, num_workers=1,
                    use_gpu=device.startswith("cuda"))
    model = Retro(cfg)
    opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    if use_deepspeed:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=deepspeed_config(t, 1))
    else:
        engine = model.to(device)
    dev = torch.device(device)
    batches = [retro_batch(cfg, micro_batch, rng) for _ in range(min(steps, 4))]
    losses, times = [], []
    for s in range(steps + 1):  # step 0 is warm-up (kernel selection, allocator), not timed
        idx, nb, tgt = (x.to(dev, non_blocking=True) for x in batches[s % len(batches)])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if use_deepspeed:
            _, loss = engine(idx, nb, tgt)
            engine.backward(loss)
            engine.step()
        else:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                _, loss = engine(idx, nb, tgt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(engine.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        value = float(loss.detach())  # synchronises
        if s:
            times.append(time.perf_counter() - t0)
            losses.append(value)
    step_s = float(np.median(times))
    return {"losses": losses, "step_s": step_s, "tokens_per_s": micro_batch * cfg.seq_len / step_s,
            "params": model.num_params()}


def init_single_rank_group(backend: str) -> None:
    """A process group of one rank (what Ray Train sets up for each worker, here by hand)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    dist.init_process_group(backend=backend, rank=0, world_size=1)


def check_training(rep: Report, steps: int, micro_batch: int, seq_len: int, n_layer: int,
                   d_model: int) -> None:
    import torch

    from ratray.retro.model import RetroConfig

    cfg = RetroConfig(vocab_size=8192, pad_id=0, chunk_tokens=64, seq_len=seq_len, n_layer=n_layer,
                      n_head=max(2, d_model // 64), d_model=d_model, enc_layers=2,
                      enc_d_model=d_model // 2, enc_n_head=max(2, d_model // 128), k=2,
                      zero_init_cca=False)
    torch.cuda.set_device(0)
    init_single_rank_group("nccl")
    rep.numbers["gpu"] = torch.cuda.get_device_name(0)
    rep.numbers["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    for precision in ("bf16", "fp32"):
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            rep.check("bf16 on this GPU", False, f"{torch.cuda.get_device_name(0)} has no bf16")
            continue
        try:
            r = train_steps(cfg, "cuda:0", steps, micro_batch, precision, use_deepspeed=True)
        except Exception as e:  # report, don't crash: the FAISS half may still have run
            rep.check(f"RETRO {precision} DeepSpeed steps on CUDA", False, f"{type(e).__name__}: {e}")
            continue
        finite = all(np.isfinite(r["losses"]))
        rep.check(f"RETRO {precision} DeepSpeed ZeRO-2 steps on CUDA (NCCL)", finite,
                  f"{steps} steps, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, "
                  f"{r['tokens_per_s']:,.0f} tokens/s, {r['params'] / 1e6:.1f}M params")
        rep.numbers[f"retro_{precision}_tokens_per_s"] = round(r["tokens_per_s"])
        rep.numbers[f"retro_{precision}_step_s"] = round(r["step_s"], 4)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a ~30 s smoke test)")
    p.add_argument("--n", type=int, default=None, help="database vectors (default 500k, quick 50k)")
    p.add_argument("--dim", type=int, default=384, help="vector size (the retriever's: 384)")
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 30, quick 8)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    n = a.n or (50_000 if a.quick else 500_000)
    steps = a.steps or (8 if a.quick else 30)

    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_check: no GPU on this machine ({reason}): nothing to check, skipped.")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"skipped": True, "reason": reason}, f, indent=1)
        return 0

    os.environ["DS_ACCELERATOR"] = "cuda"  # a CPU default (the jobs set one) must not win here
    rep = Report()
    t0 = time.perf_counter()
    if gpu_count() > 0:
        nlist = 256 if a.quick else 1024
        check_faiss(rep, n, a.dim, a.queries, a.k, nlist=nlist, nprobe=max(8, nlist // 32))
    else:
        rep.check("FAISS sees the GPU", False,
                  "torch sees a GPU but faiss has no GPU support: install the `gpu` extra "
                  "(faiss-gpu) instead of faiss-cpu")
    if torch_cuda_count() > 0:
        if a.quick:
            check_training(rep, steps, micro_batch=4, seq_len=256, n_layer=4, d_model=256)
        else:
            check_training(rep, steps, micro_batch=8, seq_len=1024, n_layer=12, d_model=768)
    else:
        rep.check("torch sees the GPU", False,
                  "faiss sees a GPU but torch is a CPU build: install a CUDA torch (see docker/Dockerfile.gpu)")
    rep.numbers["wall_s"] = round(time.perf_counter() - t0, 1)

    print("\nthroughput and timings:")
    for key, value in rep.numbers.items():
        print(f"  {key:32s} {value:,}" if isinstance(value, (int, float)) and not isinstance(value, bool)
              else f"  {key:32s} {value}")
    if "flat_gpu_qps" in rep.numbers:
        print(f"  flat GPU/CPU queries/s ratio     {rep.numbers['flat_gpu_qps'] / max(rep.numbers['flat_cpu_qps'], 1):.1f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"skipped": False, "ok": rep.ok, "checks": rep.checks, "numbers": rep.numbers}, f, indent=1)
    print(f"\ngpu_check: {'all checks passed' if rep.ok else 'FAILED'}"
          f" ({sum(c['ok'] for c in rep.checks)}/{len(rep.checks)})")
    if torch_cuda_count() > 0:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())

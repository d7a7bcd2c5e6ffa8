"""Does RETRO learn to read its neighbours on real text? RETRO[ON] vs RETRO[OFF] curves, in-process.

    python bench/retro_read.py --workdir WORKDIR [--config configs/demo.yaml] [--variants base]
                               [--steps 300] [--every 50] [--batch 8] [--threads 1]

Needs a workdir built by jobs/build_index.py. Neighbours of every train and validation chunk come
from one exact search over the whole database (train + db chunks, the leakage filter of training:
never a document of the chunk's own sequence), cached next to the chunk store. Each variant then
trains from the same seed on the same sequence order (torch AdamW with the config's lr schedule,
clip; no Ray, no DeepSpeed: the model and data of `jobs/retro_pretrain.py`, without the plumbing),
and every --every steps prints validation bits-per-byte with neighbours ON and OFF, their gap with
its paired 95% interval (bootstrap over validation documents, a document with its versions one
unit, as jobs/evaluate.py), and how many passes over the training split it has made. A variant is `name:` followed by RetroConfig
overrides joined by '+' (`cca_prior_slope=0+copy_init=0`), or `lr=` / `steps=`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ratray.config import load_config  # noqa: E402
from ratray.retro.config import RetroJobConfig  # noqa: E402


def neighbours_for(store, layout, k, vectors, metric, cache):
    from ratray.index.search import ExactIndex
    from ratray.retro.neighbours import search_layout

    if os.path.isfile(cache):
        return np.load(cache)
    db = store.database_ids()
    index = ExactIndex(vectors[db], db, metric=metric)
    ids, _ = search_layout(store, index, layout, k, vectors, progress=False)
    np.save(cache, ids)
    return ids


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    name, _, body = spec.partition(":")
    model, train = {}, {}
    for kv in filter(None, (body or "").split("+")):
        key, val = kv.split("=")
        v = eval(val, {}, {})  # numbers, tuples
        (train if key in ("lr", "steps", "min_lr") else model)[key] = v
    return name, model, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--variants", default="base:")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (demo: 2 workers x 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-seqs", type=int, default=0, help="0 = all validation sequences")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from ratray.data.versions import original_id
    from ratray.eval.lm import slot_sums
    from ratray.eval.stats import delta_interval, per_document
    from ratray.retro.batches import RetroBatches
    from ratray.retro.driver import resolve
    from ratray.retro.model import Retro
    from ratray.retro.neighbours import ChunkVectors, ensure_chunk_vectors, sequence_layout
    from ratray.workdir import Workdir

    job = load_config(RetroJobConfig, a.config, [f"workdir={a.workdir}"])
    prep = resolve(job)
    store, wd = prep.store, Workdir(a.workdir)
    l = prep.model.seq_len // prep.model.chunk_tokens
    vectors = ChunkVectors(ensure_chunk_vectors(store, job.embed, wd.embeddings, wd.vectors, False))
    k = prep.model.k
    lay = {s: sequence_layout(store, s, l) for s in ("train", "val")}
    nbr = {s: neighbours_for(store, lay[s], k, vectors, job.index.metric,
                             str(store.path / f"bench-nbr-{s}-l{l}-k{k}.npy")) for s in lay}
    bat = {s: RetroBatches(store, lay[s], k) for s in lay}
    val_rows = np.arange(len(lay["val"]) if a.val_seqs == 0 else a.val_seqs)
    n_train = len(lay["train"])
    val_ids = lay["val"][val_rows]
    live = val_ids >= 0
    _, unit = np.unique([original_id(d) for d in store.doc_ids(val_ids[live]).astype(str)],
                        return_inverse=True)
    print(f"train {n_train} sequences, val {len(val_rows)}; batch {a.batch}: one pass = "
          f"{n_train / a.batch:.0f} steps", flush=True)

    for spec in a.variants.split(","):
        name, mo, tr = parse_variant(spec)
        cfg = dataclasses.replace(prep.model, **mo)
        steps, lr = tr.get("steps", a.steps), tr.get("lr", job.train.lr)
        min_lr = tr.get("min_lr", job.train.min_lr * lr / job.train.lr)
        torch.manual_seed(0)
        model = Retro(cfg)
        opt = model.configure_optimizer(job.train.weight_decay, lr)
        rng = np.random.default_rng(0)
        order = np.concatenate([rng.permutation(n_train) for _ in range(steps * a.batch // n_train + 1)])

        def val() -> tuple[float, float, float, tuple[float, float]]:
            """bpb ON, bpb OFF, OFF − ON and its paired 95% interval."""
            (on, nbytes, _), (off, _, _) = (
                slot_sums(model, bat["val"], nbr["val"] if x else None, val_rows, 8, "cpu") for x in (1, 0))
            D = int(unit.max()) + 1
            doc = [per_document(unit, v[live], D) for v in (on, off, nbytes)]
            gap, ci = delta_interval(doc[1], doc[0], doc[2])
            bits = math.log(2) * nbytes.sum()
            return on.sum() / bits, off.sum() / bits, gap, ci

        t0 = time.perf_counter()
        for step in range(steps + 1):
            if step % a.every == 0 or step == steps:
                on, off, gap, ci = val()
                print(f"{name:>12} step {step:4d} pass {step * a.batch / n_train:4.2f} | val bpb "
                      f"ON {on:.4f} OFF {off:.4f} gap {gap:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] | "
                      f"{time.perf_counter() - t0:5.0f}s", flush=True)
            if step == steps:
                break
            w = job.train.warmup_steps
            f = (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))
            for g in opt.param_groups:
                g["lr"] = lr * f if step < w else min_lr + (lr - min_lr) * f
            rows = order[step * a.batch: (step + 1) * a.batch]
            idx, tgt = bat["train"].inputs_targets(rows)
            nb = torch.from_numpy(bat["train"].neighbours(nbr["train"][rows]))
            _, loss = model.train()(torch.from_numpy(idx), nb, torch.from_numpy(tgt))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
            opt.step()


if __name__ == "__main__":
    main()

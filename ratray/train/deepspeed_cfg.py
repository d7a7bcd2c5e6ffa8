"""The DeepSpeed config generated from `TrainConfig`, with a user file merged over it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from ratray.config import ConfigError, TrainConfig


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(t: TrainConfig, world_size: int) -> dict:
    """ZeRO stage, precision, batch sizes and clipping; the optimizer and LR schedule are torch
    objects handed to `deepspeed.initialize` (no JIT-compiled DeepSpeed optimizer op needed)."""
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # a torch AdamW, see above
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_config:
        p = Path(t.deepspeed_config)
        if not p.is_file():
            raise ConfigError(f"config 'train.deepspeed_config': file {p} does not exist")
        text = p.read_text()
        try:
            over = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"config 'train.deepspeed_config': {p} is not valid JSON/YAML: {e}") from None
        if not isinstance(over, dict):
            raise ConfigError(f"config 'train.deepspeed_config': {p} must hold a mapping")
        for key in ("optimizer", "scheduler"):
            if key in over:
                raise ConfigError(f"config 'train.deepspeed_config': {p} sets '{key}'; ratray passes a "
                                  "torch AdamW and warmup+cosine schedule (set train.lr etc. instead)")
        cfg = _merge(cfg, over)
        mb, ga = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
        cfg["train_batch_size"] = mb * ga * world_size
    return cfg


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `steps` (multiplier form below)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def lr_lambda(t: TrainConfig):
    return lambda step: lr_at(step, t) / t.lr

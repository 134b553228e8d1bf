"""AdamW with decay on matrices only, and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch

from gpt_train import parallel
from gpt_train.config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config, device_type: str) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    # Norm gains, biases and nothing else are vectors; decaying them toward zero only hurts.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    o = cfg.optim
    # One fused kernel per tensor on CUDA and CPU (the same update; on CPU the default per-op loop makes
    # ~10 passes over weights and moments and is >10x slower); MPS keeps the default.
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device_type in ("cuda", "cpu"))


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, cosine decay to schedule.min_lr at decay_steps, then the floor."""
    peak, floor = cfg.optim.lr, cfg.schedule.min_lr
    warmup = cfg.schedule.warmup_steps
    decay_end = cfg.schedule.decay_steps or cfg.train.max_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= decay_end:
        return floor
    progress = (step - warmup) / max(1, decay_end - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


class OptimizerState:
    """AdamW's moments and the fp16 loss scaler, saved by parameter name so that they load under any
    strategy and world size. Every rank takes part in `state_dict` (FSDP gathers); rank 0's is complete."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler

    def state_dict(self) -> dict:
        return {"optimizer": parallel.optimizer_state(self.model, self.optimizer),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load_state_dict(self, state: dict) -> None:
        parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

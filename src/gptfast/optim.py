"""The optimizer and its step: AdamW, the learning-rate schedule, and one step over micro-batches;
the check of a saved optimizer state against the model (:func:`check_optimizer_state`).

:func:`make_optimizer` and :func:`train_step` are what the benchmarks time, so they measure the
code that trains.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .precision import autocast


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW decaying the matrices (linear weights, embeddings) only, fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def check_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict,
                          source: object) -> None:
    """Refuse, before loading, a saved optimizer state (from ``source``, a checkpoint) holding a
    tensor that is not its parameter's shape: torch would load it and fail at the first step. The
    error names the parameter, both shapes and ``source``; other mismatches are torch's to report."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups, states = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(states, dict):
        return
    for group, saved_group in zip(optimizer.param_groups, groups):
        keys = saved_group.get("params") if isinstance(saved_group, dict) else None
        if not isinstance(keys, list) or len(keys) != len(group["params"]):
            return
        for param, key in zip(group["params"], keys):
            entry = states.get(key)
            for moment, tensor in entry.items() if isinstance(entry, dict) else ():
                if moment != "step" and isinstance(tensor, torch.Tensor) and tensor.shape != param.shape:
                    raise ValueError(f"{source} is damaged: the optimizer's {moment} of {names.get(id(param))} "
                                     f"has shape {tuple(tensor.shape)}, the parameter {tuple(param.shape)}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batches: list[tuple[torch.Tensor, torch.Tensor]], *, lr: float, grad_clip: float = 1.0,
               amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over micro-batches ``[(x, y), ...]``; returns (mean loss, gradient norm).

    The loss and norm stay on the device (no host sync). Under DDP, gradients are averaged
    across processes once, on the last micro-batch; under FSDP, reduce-scattered once, on the last.
    ``scaler`` (float16 autocast) scales the loss so small gradients survive float16; the gradients
    are unscaled before clipping, and a step whose gradients overflowed is skipped (the scale then halves).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    device_type = batches[0][0].device.type
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
        with no_sync:
            with autocast(device_type, amp_dtype):
                _, loss = model(x, y, label_smoothing=label_smoothing, z_loss=z_loss)
            scaled = loss / len(batches)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    if isinstance(norm, DTensor):  # FSDP: the norm over every process's shards, on each
        norm = norm.full_tensor()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(batches), norm



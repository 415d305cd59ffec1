"""Optimizers, learning-rate schedules and the clipping policy, from an OptimConfig."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, MultiStepLR

from bpexp.config import OptimConfig, OptimName, Schedule


def build_optimizer(
    cfg: OptimConfig, params: Iterable[torch.nn.Parameter], steps: int
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """The optimizer and its schedule over `steps` optimizer steps."""
    params = list(params)
    lr, wd = cfg.lr, cfg.weight_decay
    match cfg.name:
        case OptimName.sgd:
            opt = torch.optim.SGD(params, lr=lr, weight_decay=wd)
        case OptimName.momentum:
            opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)
        case OptimName.nesterov:
            opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=wd)
        case OptimName.adam:
            opt = torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=wd)
        case OptimName.adamw:
            opt = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=wd)
        case OptimName.rmsprop:
            opt = torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
        case OptimName.adagrad:
            opt = torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    return opt, build_schedule(cfg.schedule, opt, steps)


def build_schedule(schedule: Schedule, opt: torch.optim.Optimizer, steps: int) -> LRScheduler:
    match schedule:
        case Schedule.constant:
            return LambdaLR(opt, lambda _: 1.0)
        case Schedule.cosine:
            return CosineAnnealingLR(opt, T_max=max(steps, 1))
        case Schedule.step:
            return MultiStepLR(opt, milestones=[steps // 2, 3 * steps // 4], gamma=0.1)


def clip_gradients(params: Iterable[torch.nn.Parameter], clip_norm: float | None) -> None:
    """Scale gradients so their global norm is at most clip_norm (a no-op when off)."""
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)

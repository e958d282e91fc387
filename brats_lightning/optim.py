"""Optimizers and learning-rate schedules built from plain config (paper section 2.5, docs/method.md
"Training").

- Pipeline A: Ranger (RAdam + Lookahead k=6, alpha=0.5 + gradient centralization), lr 1e-4, no weight
  decay; lr constant for 100 epochs, then cosine decay to 0 over the last 100 (200 epochs).
- Pipeline B: Adam, lr 1e-4, no weight decay, cosine annealing over all epochs.

Both builders take plain mappings (the ``pipeline.optimizer`` / ``pipeline.scheduler`` config nodes), so
callbacks (e.g. fast SWA, which swaps in Adam with a per-cycle cosine after the main schedule) can call
them with their own small configs::

    opt = build_optimizer(net.parameters(), {"name": "adam", "lr": 5e-5})
    sched = build_scheduler(opt, {"name": "cosine", "epochs": 30})

Schedules are ``LambdaLR`` objects stepped once per epoch whose factor for epoch ``e`` (0-based, the lr used
during epoch ``e``) is :meth:`WarmupConstantCosine.__call__`'s closed form.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_optimizer
from torch.optim.lr_scheduler import LambdaLR

OptLossClosure = Callable[[], Any] | None


def centralize_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Gradient centralization (Yong et al. 2020, paper ref. [33]) in place: subtract the mean over all
    dimensions but the first (output channels) from gradients of conv / linear weights (``ndim > 1``).

    Returns:
        ``grad`` (modified in place; 0-d and 1-d gradients such as biases and norm weights are untouched).
    """
    if grad.ndim > 1:
        grad.sub_(grad.mean(dim=tuple(range(1, grad.ndim)), keepdim=True))
    return grad


class Ranger(torch_optimizer.Ranger):
    """torch-optimizer's Ranger (RAdam + Lookahead) that honours the closure and centralizes gradients.

    ``torch_optimizer.Ranger.step`` ignores its ``closure`` argument, so under PyTorch Lightning's automatic
    optimization (which passes the forward/backward as a closure to ``optimizer.step``) it steps without
    gradients and Lightning fails with "The closure hasn't been executed" (docs/method.md "Known traps"). This
    subclass runs the closure under ``torch.enable_grad()`` first and returns its loss. It also applies
    gradient centralization before the RAdam moments are updated, as the Ranger used in the paper does
    (Ranger 2020.08, ``use_gc=True``, conv and linear weights); torch-optimizer's Ranger lacks it.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper: 1e-4).
        alpha: Lookahead interpolation factor (0.5).
        k: Lookahead synchronization period in steps (6).
        n_sma_threshold: RAdam's rectification threshold (5).
        betas: Adam moment coefficients ((0.95, 0.999), Ranger's defaults).
        eps: denominator epsilon (1e-5, Ranger's default).
        weight_decay: L2 penalty (0 in the paper).
        use_gc: apply gradient centralization (True in the paper's Ranger).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        alpha: float = 0.5,
        k: int = 6,
        n_sma_threshold: int = 5,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        use_gc: bool = True,
    ) -> None:
        super().__init__(params, lr=lr, alpha=alpha, k=k, N_sma_threshhold=n_sma_threshold,
                         betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.use_gc = use_gc

    @torch.no_grad()
    def step(self, closure: OptLossClosure = None) -> Any:
        """One Ranger step; ``closure`` (if given) re-evaluates the model and is run first.

        Returns:
            The closure's return value (the loss), or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.use_gc:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        centralize_gradient(p.grad)
        with warnings.catch_warnings():
            # torch-optimizer 0.3 uses the deprecated positional-scalar overloads of add_/addcmul_/addcdiv_.
            warnings.filterwarnings("ignore", message=r"This overload of .* is deprecated",
                                    category=UserWarning)
            super().step()
        return loss


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict], cfg: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """Optimizer from a plain config ``{"name": "ranger" | "adam" | "adamw" | "sgd", "lr": ..., ...}``.

    Keys besides ``name`` are passed to the optimizer (e.g. ``weight_decay``, ``betas``, ``k``, ``alpha``,
    ``use_gc`` for Ranger, ``momentum`` for SGD).

    Raises:
        ValueError: unknown optimizer name.
    """
    options = {k: (tuple(v) if k == "betas" else v) for k, v in dict(cfg).items() if k != "name"}
    name = str(cfg.get("name", "")).lower()
    if name == "ranger":
        return Ranger(params, **options)
    if name == "adam":
        return torch.optim.Adam(params, **options)
    if name == "adamw":
        return torch.optim.AdamW(params, **options)
    if name == "sgd":
        return torch.optim.SGD(params, **options)
    raise ValueError(
        f"unknown optimizer {cfg.get('name')!r} in the optimizer config {dict(cfg)}; "
        "expected one of 'ranger', 'adam', 'adamw', 'sgd' (see conf/pipeline/)"
    )


@dataclass(frozen=True)
class WarmupConstantCosine:
    """Per-epoch lr factor: linear warm-up, constant, then cosine decay (a picklable ``LambdaLR`` lambda).

    For epoch ``e`` (0-based) with ``W = warmup_epochs``, ``C = constant_epochs``, ``T = epochs - W - C``:

    - ``e < W``: ``(e + 1) / (W + 1)``;
    - ``W <= e < W + C``: 1;
    - otherwise, with ``t = min(e - W - C, T)``: ``m + (1 - m) * (1 + cos(pi * t / T)) / 2`` where
      ``m = min_factor`` (the final lr is ``m * lr``, reached at epoch ``epochs``, kept afterwards).

    Pipeline A (paper): ``epochs=200, constant_epochs=100`` -> lr constant for epochs 0-99, then
    ``CosineAnnealingLR(T_max=100)`` over epochs 100-199. Pipeline B: ``constant_epochs=0`` ->
    ``CosineAnnealingLR(T_max=epochs)``.
    """

    epochs: int
    warmup_epochs: int = 0
    constant_epochs: int = 0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        w, c = self.warmup_epochs, self.constant_epochs
        if w < 0 or c < 0 or w + c > self.epochs:
            raise ValueError(
                f"schedule: warmup_epochs={w} + constant_epochs={c} must be >= 0 and <= "
                f"epochs={self.epochs} (see the scheduler config in conf/pipeline/)"
            )

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        decay_start = self.warmup_epochs + self.constant_epochs
        if epoch < decay_start:
            return 1.0
        span = self.epochs - decay_start
        if span <= 0:
            return 1.0
        t = min(epoch - decay_start, span)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t / span))


SCHEDULES = ("cosine", "constant_cosine", "constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any]) -> LambdaLR:
    """Per-epoch ``LambdaLR`` from a plain config.

    Config keys: ``name`` ("cosine": warm-up then cosine over ``epochs``; "constant_cosine": warm-up, constant
    for ``constant_epochs``, then cosine; "constant": fixed lr), ``epochs`` (length of the schedule),
    ``warmup_epochs`` (0), for constant_cosine either ``constant_epochs`` or ``constant_fraction`` (of the
    epochs after warm-up, rounded; pipeline A: 0.5 of 200 = 100), ``min_lr`` (absolute lr at the end, 0) or
    ``min_factor`` (relative).

    Raises:
        ValueError: unknown schedule name or inconsistent epoch counts.
    """
    name = str(cfg.get("name", "")).lower()
    if name not in SCHEDULES:
        raise ValueError(
            f"unknown scheduler {cfg.get('name')!r} in {dict(cfg)}; expected one of {SCHEDULES} "
            "(see conf/pipeline/)"
        )
    epochs = int(cfg["epochs"])
    warmup = int(cfg.get("warmup_epochs", 0) or 0)
    if name == "constant":
        constant = epochs - warmup
    elif name == "constant_cosine":
        if cfg.get("constant_epochs") is not None:
            constant = int(cfg["constant_epochs"])
        else:
            constant = round(float(cfg["constant_fraction"]) * (epochs - warmup))
    else:
        constant = 0
    base_lr = optimizer.param_groups[0]["lr"]
    if cfg.get("min_factor") is not None:
        min_factor = float(cfg["min_factor"])
    else:
        min_factor = float(cfg.get("min_lr", 0.0) or 0.0) / base_lr
    return LambdaLR(optimizer, WarmupConstantCosine(epochs, warmup, constant, min_factor))

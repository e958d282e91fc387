"""Memory plan, fit check and activation checkpointing (docs/performance.md "Memory plan").

The paper trains EquiUnet w=48 on 128^3 crops (pipeline A batch 1, B batch 3; paper section 2.5). A job that
does not fit its device should be refused before it starts, with settings that fit, instead of running out of
memory an hour in or at the first whole-brain validation.

- :func:`build_network` builds the network of a ``model`` config; ``model.checkpointing: true`` recomputes
  each U-Net stage (two conv-norm-ReLU blocks, :class:`~brats_lightning.models.blocks.Stage`) in the backward
  pass instead of keeping its activations (``torch.utils.checkpoint``, non-reentrant). Weights, checkpoint
  keys and results are those of the plain network.
- :func:`plan_training` / :func:`plan_inference` estimate peak memory without a device: the network runs on
  the ``meta`` device (shapes only), autograd's saved-tensor hooks add up what the backward pass keeps, and
  16-mixed / bf16-mixed cast as CUDA autocast does (convolutions and linear layers in half precision,
  GroupNorm and reductions in float32).
- :func:`check_training_fits` / :func:`check_inference_fits` compare a plan with the device's free memory
  (``torch.cuda.mem_get_info``, or ``MemAvailable`` on the CPU; ``BRATS_MEMORY_BUDGET_GB`` overrides both)
  and raise :class:`~brats_lightning.errors.UserError` naming settings that fit.
"""

from __future__ import annotations

import functools
import json
import math
import os
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from brats_lightning.errors import UserError

GIB = 2**30
BUDGET_ENV = "BRATS_MEMORY_BUDGET_GB"
"""Environment variable: device memory (GiB) the fit check may use, instead of the measured free memory."""

HEADROOM = 0.9
"""Fraction of the free memory a plan may fill (allocator fragmentation, cuDNN workspaces, the framework)."""

MIXED_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


# ------------------------------------------------------------------------------- activation checkpointing
def network_config(model_config: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Split a ``model`` config into the network's own kwargs and the ``checkpointing`` flag.

    ``checkpointing`` is a training option, not part of the network: run.json keeps the config without it.
    """
    config = dict(model_config)
    return config, bool(config.pop("checkpointing", False))


def build_network(model_config: Mapping[str, Any]) -> nn.Module:
    """Instantiate the network of a ``model`` config (``_target_`` + kwargs); with ``checkpointing: true``
    its stages recompute their activations in the backward pass (:func:`enable_checkpointing`)."""
    import hydra.utils

    config, checkpointing = network_config(model_config)
    net = hydra.utils.instantiate(config)
    if checkpointing:
        enable_checkpointing(net)
    return net


def _checkpointed_forward(module: nn.Module, *args: Any) -> Any:
    plain = type(module).forward
    if not torch.is_grad_enabled():  # validation, inference: nothing to keep for a backward pass
        return plain(module, *args)
    return checkpoint(plain, module, *args, use_reentrant=False)


def checkpoint_units(net: nn.Module) -> list[nn.Module]:
    """The modules :func:`enable_checkpointing` recomputes: every U-Net stage (encoders, bottoms,
    decoders)."""
    from brats_lightning.models.blocks import Stage

    return [m for m in net.modules() if isinstance(m, Stage)]


def enable_checkpointing(net: nn.Module) -> int:
    """Recompute each stage of ``net`` in the backward pass (docs/performance.md "Activation checkpointing").

    The stage's forward is replaced on the instance, so parameter names, ``state_dict`` keys and deep copies
    are unchanged; GroupNorm / InstanceNorm keep no running statistics, so recomputation gives the same
    values.

    Returns:
        The number of checkpointed stages.

    Raises:
        ValueError: ``net`` has no stages (not one of the package's U-Nets).
    """
    units = checkpoint_units(net)
    if not units:
        raise ValueError(f"model.checkpointing=true: {type(net).__name__} has no U-Net stages to checkpoint")
    for unit in units:
        unit.forward = functools.partial(_checkpointed_forward, unit)
    return len(units)


# ----------------------------------------------------------------------------------------------- tracing
_HALF_OPS = {F.conv3d, torch.conv3d, F.linear, torch.matmul, torch.Tensor.matmul}
"""Ops CUDA autocast runs in half precision (among those the networks use)."""

_FLOAT_OPS = {F.group_norm, torch.group_norm, F.layer_norm, torch.sum, torch.Tensor.sum, torch.prod,
              torch.Tensor.prod, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow,
              torch.Tensor.pow, torch.Tensor.__pow__, F.softmax, F.log_softmax, torch.mean, torch.Tensor.mean}
"""Ops CUDA autocast runs in float32."""


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Tracer(TorchFunctionMode):
    """Meta-device tracing: autocast's casts (``mixed`` dtype or None), the largest tensor produced and, when
    ``live`` is set, the peak of the bytes held by live tensors (no-grad passes: only Python holds them)."""

    def __init__(self, mixed: torch.dtype | None, live: bool) -> None:
        super().__init__()
        self.mixed = mixed
        self.track_live = live
        self.largest = 0
        self.counts: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        return value

    def _release(self, key: int) -> None:
        self.counts[key] -= 1
        if not self.counts[key]:
            self.live -= self.sizes.pop(key)
            del self.counts[key]

    def hold(self, t: torch.Tensor) -> None:
        """Count ``t`` as live until its Python object is gone."""
        key = _storage_key(t)
        if key not in self.counts:
            self.counts[key] = 0
            self.sizes[key] = _nbytes(t)
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.counts[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_function__(self, func: Callable, types: Iterable, args: tuple = (), kwargs: dict | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        if self.mixed is not None and func in _HALF_OPS:
            args = self._cast(args, self.mixed)
            kwargs = {k: self._cast(v, self.mixed) for k, v in kwargs.items()}
        elif self.mixed is not None and func in _FLOAT_OPS:
            args = self._cast(args, torch.float32)
            kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outputs:
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                self.largest = max(self.largest, _nbytes(t))
                if self.track_live:
                    self.hold(t)
        return out


def _mixed_dtype(precision: str) -> torch.dtype | None:
    if precision in ("32", "32-true"):
        return None
    if precision in MIXED_DTYPES:
        return MIXED_DTYPES[precision]
    raise ValueError(f"memory plan: precision={precision!r}; expected 32-true, 16-mixed or bf16-mixed")


def _meta_network(model_config: Mapping[str, Any]) -> nn.Module:
    import hydra.utils

    config, _ = network_config(model_config)
    with torch.device("meta"):
        return hydra.utils.instantiate(config)


def _param_bytes(net: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


@functools.cache
def optimizer_state_ratio(name: str) -> float:
    """Bytes of optimizer state per byte of parameters after one step (Adam 2, Ranger 3: its moments and
    the Lookahead slow weights), measured on a small parameter with
    :func:`brats_lightning.optim.build_optimizer`."""
    from brats_lightning.optim import build_optimizer

    param = nn.Parameter(torch.zeros(64))
    param.grad = torch.ones(64)
    optimizer = build_optimizer([param], {"name": name, "lr": 1e-3})
    optimizer.step()
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.numel() > 1)
    return state / (param.numel() * param.element_size())


# ----------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    """Peak memory of one job, in bytes, by part (docs/performance.md "Memory plan").

    Attributes:
        parameters: the network's float32 weights.
        gradients: their gradients (training; kept during validation).
        optimizer_state: the optimizer's buffers (Adam 2x, Ranger 3x the parameters).
        activations: tensors kept for the backward pass (training), or the peak of the live tensors of one
            forward pass (inference); with checkpointing, the stage inputs plus one recomputed stage.
        transient: the input batch plus, in training, the largest tensor's gradient pair in the backward pass.
    """

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int

    @property
    def total(self) -> int:
        """Sum of the parts."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations + self.transient

    def describe(self) -> str:
        """One line, GiB per part."""
        parts = ("parameters", "gradients", "optimizer_state", "activations", "transient")
        detail = ", ".join(f"{p.replace('_', ' ')} {getattr(self, p) / GIB:.2f}" for p in parts)
        return f"{self.total / GIB:.2f} GiB ({detail})"


def _trace_training(model_config: Mapping[str, Any], shape: Sequence[int], precision: str
                    ) -> tuple[int, dict[int, int], dict[int, int], set[int], list[set[int]], int]:
    """One meta-device training forward + deep-supervision Dice loss.

    Returns (parameter bytes, saved storage -> bytes, stage input storage -> bytes, storages saved outside
    any stage, per stage the storages its recomputation holds (its input and what it saves), largest
    tensor bytes)."""
    from brats_lightning.losses import DeepSupervisionLoss, DiceLoss

    net = _meta_network(model_config).train()
    params = {_storage_key(p) for p in net.parameters()}
    saved: dict[int, int] = {}
    kept_inputs: dict[int, int] = {}
    stage_stack: list[set[int]] = []
    outside: set[int] = set()
    stages: list[set[int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if t.device.type == "meta" and key not in params:
            saved.setdefault(key, _nbytes(t))
            (stage_stack[-1] if stage_stack else outside).add(key)
        return t

    def enter(module: nn.Module, args: tuple) -> None:
        inputs = {_storage_key(a): _nbytes(a) for a in args if isinstance(a, torch.Tensor)}
        kept_inputs.update(inputs)  # a checkpointed stage keeps its input for the recomputation
        stage_stack.append(set(inputs))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        stages.append(stage_stack.pop())

    handles = []
    for unit in checkpoint_units(net):
        handles += [unit.register_forward_pre_hook(enter), unit.register_forward_hook(leave)]
    image = torch.empty(*shape, device="meta")
    target = torch.empty(shape[0], net.out_channels, *shape[2:], device="meta")
    tracer = _Tracer(_mixed_dtype(precision), live=False)
    with tracer, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DeepSupervisionLoss(DiceLoss(squared=True))(net(image), target)
    for handle in handles:
        handle.remove()
    return _param_bytes(net), saved, kept_inputs, outside, stages, tracer.largest


@functools.lru_cache(maxsize=64)
def _cached_trace(config_json: str, shape: tuple[int, ...], precision: str
                  ) -> tuple[int, dict[int, int], dict[int, int], set[int], list[set[int]], int]:
    """:func:`_trace_training` once per (network, input shape, precision): the fit check's alternatives
    share traces (with and without checkpointing come from one)."""
    return _trace_training(json.loads(config_json), shape, precision)


def plan_training(model_config: Mapping[str, Any], crop_size: int | Sequence[int], batch_size: int,
                  precision: str = "32-true", optimizer: str = "adam", checkpointing: bool | None = None
                  ) -> MemoryPlan:
    """Peak memory of a training step (docs/performance.md "Memory plan"), without a device.

    Args:
        model_config: the ``model`` config (``_target_`` + kwargs; ``checkpointing`` read from it unless
            given).
        crop_size: training crop side(s) (128 in the paper).
        batch_size: crops per step (A 1, B 3).
        precision: "32-true", "16-mixed" or "bf16-mixed".
        optimizer: optimizer name (``pipeline.optimizer.name``).
        checkpointing: recompute stages in the backward pass (default: ``model_config["checkpointing"]``).
    """
    if checkpointing is None:
        checkpointing = network_config(model_config)[1]
    crop = (crop_size,) * 3 if isinstance(crop_size, int) else tuple(crop_size)
    in_channels = int(model_config.get("in_channels", 4))
    params, saved, kept_inputs, outside, stages, largest = _cached_trace(
        json.dumps(network_config(model_config)[0], sort_keys=True), (batch_size, in_channels, *crop),
        precision)
    if checkpointing:
        sizes = {**saved, **kept_inputs}
        kept = outside | set(kept_inputs)
        activations = sum(sizes[k] for k in kept) + max(sum(sizes[k] for k in s - kept) for s in stages)
    else:
        activations = sum(saved.values())
    batch = batch_size * math.prod(crop) * (in_channels * 4 + 3 * 4)  # float32 image + float target
    return MemoryPlan(parameters=params, gradients=params, optimizer_state=int(params * optimizer_state_ratio(
        optimizer)), activations=activations, transient=batch + 2 * largest)


def plan_inference(model_config: Mapping[str, Any], shape: Sequence[int], batch_size: int = 1,
                   precision: str = "32-true") -> MemoryPlan:
    """Peak memory of one no-grad forward pass on ``batch_size`` volumes of spatial ``shape`` (a whole-brain
    validation case, or ``batch_size`` TTA views), parameters included; no gradients or optimizer state."""
    net = _meta_network(model_config).eval()
    in_channels = int(model_config.get("in_channels", 4))
    image = torch.empty(batch_size, in_channels, *shape, device="meta")
    tracer = _Tracer(_mixed_dtype(precision), live=True)
    with tracer, torch.no_grad():
        out = net(image)
        torch.sigmoid(out)
    return MemoryPlan(parameters=_param_bytes(net), gradients=0, optimizer_state=0, activations=tracer.peak,
                      transient=_nbytes(image))


def padded_shape(shape: Sequence[int], multiple: int = 8) -> tuple[int, ...]:
    """``shape`` with each side rounded up to a multiple of ``multiple`` (the networks pool 3 times)."""
    return tuple(-(-int(s) // multiple) * multiple for s in shape)


# ---------------------------------------------------------------------------------------------- fit check
def available_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes the job may use, where that number came from): ``BRATS_MEMORY_BUDGET_GB`` when set, else the
    free memory of the CUDA device (``torch.cuda.mem_get_info``), else the CPU's ``MemAvailable``."""
    budget = os.environ.get(BUDGET_ENV)
    if budget:
        try:
            return int(float(budget) * GIB), f"{BUDGET_ENV}={budget}"
        except ValueError:
            raise UserError(
                f"{BUDGET_ENV}={budget!r}: expected a number of GiB, e.g. {BUDGET_ENV}=20") from None
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device} ({torch.cuda.get_device_name(device)})"
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024, "available RAM (MemAvailable)"


def _fits(plan: MemoryPlan, budget: int) -> bool:
    return plan.total <= HEADROOM * budget


@dataclass(frozen=True)
class TrainingSetting:
    """A training setting that fits (:func:`fitting_settings`) and its plan."""

    checkpointing: bool
    crop_size: int
    batch_size: int
    plan: MemoryPlan

    def overrides(self, checkpointing: bool, crop_size: int, batch_size: int) -> str:
        """The Hydra overrides that turn (``checkpointing``, ``crop_size``, ``batch_size``) into this one."""
        ckpt = str(self.checkpointing).lower()
        parts = [f"model.checkpointing={ckpt}" if self.checkpointing != checkpointing else "",
                 f"pipeline.batch_size={self.batch_size}" if self.batch_size != batch_size else "",
                 f"data.crop_size={self.crop_size}" if self.crop_size != crop_size else ""]
        return " ".join(p for p in parts if p)


def fitting_settings(model_config: Mapping[str, Any], crop_size: int, batch_size: int, precision: str,
                     optimizer: str, budget: int, limit: int = 3) -> list[TrainingSetting]:
    """Up to ``limit`` settings that fit ``budget`` bytes, most faithful first: the same crop and batch with
    checkpointing, then smaller batches, then smaller crops (multiples of 16), each without and with
    checkpointing (never without when the config already checkpoints)."""
    checkpointing = network_config(model_config)[1]
    options: list[tuple[bool, int, int]] = [(True, crop_size, batch_size)]
    options += [(ckpt, crop_size, b) for b in range(batch_size - 1, 0, -1) for ckpt in (False, True)]
    options += [(ckpt, c, b) for c in range(crop_size - 16, 31, -16) for b in range(batch_size, 0, -1)
                for ckpt in (False, True)]
    found: list[TrainingSetting] = []
    for ckpt, crop, batch in options:
        if ckpt < checkpointing:
            continue
        plan = plan_training(model_config, crop, batch, precision, optimizer, ckpt)
        if _fits(plan, budget):
            found.append(TrainingSetting(ckpt, crop, batch, plan))
            if len(found) == limit or (ckpt, crop, batch) == (True, crop_size, batch_size):
                break
    return found


def check_training_fits(model_config: Mapping[str, Any], crop_size: int | Sequence[int], batch_size: int,
                        precision: str, optimizer: str, device: torch.device | str) -> MemoryPlan:
    """Refuse a training job whose step does not fit the device (docs/performance.md "Memory plan").

    Returns:
        The training step's plan.

    Raises:
        UserError: the plan exceeds 90% of the free memory; the message lists settings that fit.
    """
    budget, source = available_memory(device)
    plan = plan_training(model_config, crop_size, batch_size, precision, optimizer)
    if not _fits(plan, budget):
        crop = crop_size if isinstance(crop_size, int) else max(crop_size)
        checkpointing = network_config(model_config)[1]
        fits = [f"{f.overrides(checkpointing, crop, batch_size)} ({f.plan.total / GIB:.1f} GiB)"
                for f in fitting_settings(model_config, crop, batch_size, precision, optimizer, budget)]
        hint = ("; ".join(fits) if fits else "none of crop >= 32, batch >= 1, with or without checkpointing; "
                "use a device with more memory or a smaller model.width")
        raise UserError(
            f"memory plan: training {model_config.get('_target_', 'the network')} width "
            f"{model_config.get('width')} on {crop_size} crops, batch {batch_size}, {precision}, "
            f"checkpointing {network_config(model_config)[1]} needs about {plan.describe()}; {source} is "
            f"{budget / GIB:.1f} GiB ({HEADROOM:.0%} usable). Settings that fit: {hint}")
    return plan


def check_validation_fits(training: MemoryPlan, model_config: Mapping[str, Any], shape: Sequence[int],
                          precision: str, device: torch.device | str) -> int:
    """Refuse a job whose whole-brain validation of its largest validation brain box ``shape`` (padded here)
    does not fit next to the training state (weights, gradients, optimizer state). Returns the bytes needed.

    Raises:
        UserError: naming the box, the need and the fixes.
    """
    budget, source = available_memory(device)
    resident = training.parameters + training.gradients + training.optimizer_state
    forward = plan_inference(model_config, padded_shape(shape), 1, precision)
    need = resident + forward.activations + forward.transient
    if need > HEADROOM * budget:
        raise UserError(
            f"memory plan: whole-brain validation of the largest validation brain box {tuple(shape)} needs "
            f"about {need / GIB:.2f} GiB (weights, gradients and optimizer state {resident / GIB:.2f} + "
            f"forward pass {(need - resident) / GIB:.2f}); {source} is {budget / GIB:.1f} GiB "
            f"({HEADROOM:.0%} usable). "
            "Fix: a device with more memory, or train without whole-brain validation "
            "(trainer.limit_val_batches=0) and predict the validation cases with "
            "`brats-lightning predict --view-batch 1`")
    return need


def _job_settings(cfg: Any) -> tuple[dict[str, Any], int | list[int], torch.device]:
    """(model config, crop size, device) of a training config, as train.py resolves them: the CPU, or the
    CUDA device of this rank (``LOCAL_RANK``)."""
    from omegaconf import OmegaConf

    from brats_lightning.precision import runs_on_cpu

    crop = cfg.data.crop_size if isinstance(cfg.data.crop_size, int) else list(cfg.data.crop_size)
    device = (torch.device("cpu") if runs_on_cpu(cfg.trainer.get("accelerator", "auto"))
              else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    return OmegaConf.to_container(cfg.model, resolve=True), crop, device


def check_training_job(cfg: Any, precision: str) -> MemoryPlan:
    """train.py's first check, before any data is read: the training step of ``cfg`` (model, data.crop_size,
    pipeline.batch_size and optimizer) in the trainer ``precision`` train.py resolved, on its device
    (seconds). Returns the step's plan, for :func:`check_validation_job`.

    Raises:
        UserError: it does not fit; the message lists settings that fit.
    """
    model_config, crop, device = _job_settings(cfg)
    return check_training_fits(model_config, crop, int(cfg.pipeline.batch_size), str(precision),
                               str(cfg.pipeline.optimizer.name), device)


def check_validation_job(cfg: Any, datamodule: Any, training: MemoryPlan, precision: str) -> int | None:
    """train.py's second check, once ``datamodule`` is set up: the whole-brain validation of its largest
    validation brain box next to the ``training`` state (the plan :func:`check_training_job` returned).
    Returns the bytes needed (None: no validation, or a rank whose datamodule was not set up).

    Raises:
        UserError: it does not fit.
    """
    if not datamodule.val_cases or cfg.trainer.get("limit_val_batches") == 0:
        return None
    model_config, _, device = _job_settings(cfg)
    boxes = [datamodule.cache.get(case).box.shape for case in datamodule.val_cases]
    return check_validation_fits(training, model_config, max(boxes, key=math.prod), str(precision), device)


def check_inference_fits(model_configs: Sequence[Mapping[str, Any]], shape: Sequence[int],
                         view_batch_size: int, amp_dtype: torch.dtype | None, device: torch.device | str,
                         case: str = "a case") -> int:
    """Refuse whole-brain prediction of ``case`` (brain box of spatial ``shape``, padded here) by the networks
    of ``model_configs`` (all loaded; run one after the other) with ``view_batch_size`` TTA views per call if
    it does not fit the device. Returns the bytes needed.

    Raises:
        UserError: with the largest ``--view-batch`` that fits, or the advice to predict on another device.
    """
    budget, source = available_memory(device)
    precision = {None: "32-true", torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed"}[amp_dtype]
    padded = padded_shape(shape)

    # an ensemble repeats its model configs (the folds of one model): plan each distinct one once
    keys = [json.dumps(config, sort_keys=True, default=str) for config in model_configs]
    configs, counts = dict(zip(keys, model_configs, strict=True)), Counter(keys)

    def need(views: int) -> int:
        plans = {key: plan_inference(config, padded, views, precision) for key, config in configs.items()}
        running = 2 * 3 * 4 * math.prod(padded)  # the running mean and spread over views (float32)
        return (sum(counts[key] * p.parameters for key, p in plans.items())
                + max(p.activations + p.transient for p in plans.values()) + running)

    total = need(view_batch_size)
    if total > HEADROOM * budget:
        smaller = [v for v in range(view_batch_size - 1, 0, -1) if need(v) <= HEADROOM * budget]
        fix = (f"--view-batch {smaller[0]} (predict.yaml view_batch_size={smaller[0]})" if smaller else
               "predict on a device with more memory (--device), or with fewer runs (--select best2)")
        raise UserError(
            f"memory plan: predicting case {case} (brain box {tuple(shape)}) with {len(model_configs)} "
            f"network(s), {view_batch_size} view(s) per call, {precision}, needs about "
            f"{total / GIB:.2f} GiB; {source} is {budget / GIB:.1f} GiB ({HEADROOM:.0%} usable). Fix: {fix}")
    return total

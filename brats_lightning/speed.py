"""Speed switches for training: memory format, cuDNN autotuning, ``torch.compile`` (issue 7).

Each switch is a key of the ``speed`` config group (conf/speed/default.yaml) that takes ``auto`` or an
explicit value. :func:`resolve_speed` turns the config into a :class:`SpeedPlan` for the device and precision
that will train, with the reason for every automatic choice; :class:`~brats_lightning.module.BratsModule`
applies the plan in ``configure_model`` (before the optimizer exists) and train.py passes the cuDNN choice to
the Trainer. What ``auto`` picks, and why (SPEC.md "Measured anchors"; docs/performance.md):

- ``memory_format``: ``channels_last_3d`` (NDHWC) on CPU, where oneDNN's 3D convolutions run faster with it
  for the small demo U-Nets in fp32 and in bf16 (benchmarks/RESULTS.md); ``contiguous`` on CUDA, where it
  made the H200 step slower (60 vs 42 ms compiled, 106 vs 82 ms eager) and on other devices.
- ``cudnn_benchmark``: on for CUDA (one autotuning pass per input shape; training crops have one shape),
  off elsewhere and whenever the trainer is deterministic.
- ``compile``: ``torch.compile`` of the network's training forward on CUDA (SPEC.md: 82 -> 42 ms per
  w=48 step in fp16); off on CPU, where the compilation time (minutes on 2 cores) outweighs what a
  few-minute demo gains.

Not provided, on purpose: a fused GroupNorm/InstanceNorm + ReLU layer (eager PyTorch has no fused kernel to
call, a Python ``autograd.Function`` still makes the same memory passes, and inductor already fuses the
norm's elementwise tail with the ReLU when ``compile`` is on), and CUDA graphs (``compile_mode:
reduce-overhead``) as a default: they can't be tested on the CPU-only machine this suite is built on;
the mode is passed through untested for those who want to try it.

The compiled callable is kept outside the module tree (see :class:`CompiledNet`), so checkpoints keep
``net.<param>`` keys with no ``_orig_mod.`` and the inference loader reads them unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous": torch.contiguous_format,
    "channels_last_3d": torch.channels_last_3d,
}
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AUTO = "auto"


def _auto_or_bool(name: str, value: Any) -> bool | str:
    if isinstance(value, str) and value.lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"speed.{name}={value!r}: expected auto, true or false (conf/speed/default.yaml)")


@dataclass(frozen=True)
class SpeedConfig:
    """The ``speed`` config group (conf/speed/default.yaml); ``auto`` values are resolved per device.

    Attributes:
        memory_format: "auto", "contiguous" or "channels_last_3d" (network weights and inputs).
        cudnn_benchmark: "auto" (on for CUDA), True or False.
        compile: "auto" (on for CUDA), True or False: ``torch.compile`` of the network for training steps.
        compile_mode: ``torch.compile`` mode (None = "default"; "max-autotune-no-cudagraphs";
            "reduce-overhead" uses CUDA graphs and is untested here).
        compile_dynamic: ``torch.compile``'s ``dynamic`` (False: static shapes; training crops have one
            shape, a smaller last batch compiles one more graph).
    """

    memory_format: str = AUTO
    cudnn_benchmark: bool | str = AUTO
    compile: bool | str = AUTO
    compile_mode: str | None = None
    compile_dynamic: bool | None = False

    def __post_init__(self) -> None:
        if self.memory_format != AUTO and self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"speed.memory_format={self.memory_format!r}: expected auto, "
                             f"{' or '.join(MEMORY_FORMATS)} (conf/speed/default.yaml)")
        object.__setattr__(self, "cudnn_benchmark", _auto_or_bool("cudnn_benchmark", self.cudnn_benchmark))
        object.__setattr__(self, "compile", _auto_or_bool("compile", self.compile))
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"speed.compile_mode={self.compile_mode!r}: expected null or one of "
                             f"{[m for m in COMPILE_MODES if m]} (torch.compile modes)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | SpeedConfig | None) -> SpeedConfig:
        """Build from a dict / config node (None -> all defaults), refusing unknown keys."""
        if mapping is None:
            return cls()
        if isinstance(mapping, SpeedConfig):
            return mapping
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise ValueError(f"unknown speed option(s) {unknown}; expected some of {sorted(names)} "
                             "(conf/speed/default.yaml)")
        return cls(**{k: mapping[k] for k in mapping})


@dataclass(frozen=True)
class SpeedPlan:
    """Resolved switches for one device and precision (:func:`resolve_speed`).

    Attributes:
        device_type: "cpu", "cuda", ...
        precision: the Lightning precision the plan was resolved for.
        memory_format: "contiguous" or "channels_last_3d".
        cudnn_benchmark: value for ``torch.backends.cudnn.benchmark`` / ``Trainer(benchmark=...)``.
        compile: compile the network for training steps.
        compile_mode: ``torch.compile`` mode.
        compile_dynamic: ``torch.compile`` ``dynamic``.
        reasons: switch -> why it has its value (logged once).
    """

    device_type: str
    precision: str
    memory_format: str = "contiguous"
    cudnn_benchmark: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_dynamic: bool | None = False
    reasons: tuple[tuple[str, str], ...] = ()

    @property
    def torch_memory_format(self) -> torch.memory_format:
        """The ``torch.memory_format`` of :attr:`memory_format`."""
        return MEMORY_FORMATS[self.memory_format]

    def describe(self) -> str:
        """One line: every switch with its value and reason."""
        compiled = f"True (mode {self.compile_mode or 'default'})" if self.compile else False
        values = {"memory_format": self.memory_format, "cudnn_benchmark": self.cudnn_benchmark,
                  "compile": compiled}
        why = dict(self.reasons)
        return "; ".join(f"{k}={v} ({why[k]})" if k in why else f"{k}={v}" for k, v in values.items())


def _half(precision: str) -> bool:
    return str(precision).startswith(("16", "bf16"))


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH (inductor needs one to compile for the CPU)."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def resolve_speed(
    config: Mapping[str, Any] | SpeedConfig | None,
    device_type: str,
    precision: str | int = "32-true",
    deterministic: bool = False,
) -> SpeedPlan:
    """Resolve the ``auto`` switches of ``config`` for ``device_type`` and ``precision``.

    Args:
        config: the ``speed`` config (None: defaults, i.e. everything ``auto``).
        device_type: where training runs ("cpu", "cuda", "mps", ...).
        precision: the Lightning precision that will be used (after the CPU fallback of
            :func:`brats_lightning.precision.resolve_precision`).
        deterministic: the trainer's ``deterministic`` flag (cuDNN autotuning is then left off).

    Returns:
        The plan, with a reason for every automatic choice.

    Raises:
        ValueError: ``compile: true`` on the CPU without a C++ compiler (inductor needs one).
    """
    cfg = SpeedConfig.from_mapping(config)
    precision = str(precision)
    reasons: list[tuple[str, str]] = []

    memory_format = cfg.memory_format
    if memory_format == AUTO:
        if device_type == "cpu":
            memory_format = "channels_last_3d"
            reasons.append(("memory_format", "auto: faster oneDNN Conv3d on CPU in fp32 and bf16, "
                                             "benchmarks/RESULTS.md"))
        else:
            memory_format = "contiguous"
            why = ("auto: channels_last_3d slowed the H200 step (SPEC.md anchors)" if device_type == "cuda"
                   else f"auto: not measured on {device_type}")
            reasons.append(("memory_format", why))

    benchmark = cfg.cudnn_benchmark
    if benchmark == AUTO:
        benchmark = device_type == "cuda" and not deterministic
        why = ("auto: deterministic trainer" if device_type == "cuda" and deterministic
               else "auto: on for CUDA" if device_type == "cuda" else "auto: CUDA only")
        reasons.append(("cudnn_benchmark", why))
    elif benchmark and deterministic:
        log.warning("speed.cudnn_benchmark=true with a deterministic trainer: PyTorch then ignores "
                    "cudnn.deterministic; set speed.cudnn_benchmark=false for reproducible runs")

    compiled = cfg.compile
    if compiled == AUTO:
        compiled = device_type == "cuda"
        why = ("auto: on for CUDA (SPEC.md: 82 -> 42 ms per w=48 fp16 step)" if compiled
               else "auto: off on CPU (compilation takes minutes on a few cores)" if device_type == "cpu"
               else f"auto: not tested on {device_type}")
        reasons.append(("compile", why))
    if compiled and device_type == "cpu" and not has_cxx_compiler():
        raise ValueError("speed.compile=true on the CPU needs a C++ compiler (g++ / clang++) for inductor; "
                         "none is on PATH: install one or set speed.compile=false")
    return SpeedPlan(device_type=device_type, precision=precision, memory_format=memory_format,
                     cudnn_benchmark=bool(benchmark), compile=bool(compiled), compile_mode=cfg.compile_mode,
                     compile_dynamic=cfg.compile_dynamic, reasons=tuple(reasons))


def convert_module(net: nn.Module, plan: SpeedPlan) -> nn.Module:
    """Put ``net``'s parameters and buffers in the plan's memory format (in place; returns ``net``).

    Parameters keep their identity (``Module.to`` replaces ``.data``), so an existing optimizer still works.
    """
    if plan.memory_format != "contiguous":
        net.to(memory_format=plan.torch_memory_format)
    return net


def convert_input(x: torch.Tensor, plan: SpeedPlan | None) -> torch.Tensor:
    """``x`` in the plan's memory format (5-D tensors only; a no-op without a plan or for contiguous)."""
    if plan is None or plan.memory_format == "contiguous" or x.ndim != 5:
        return x
    return x.contiguous(memory_format=plan.torch_memory_format)


class CompiledNet:
    """A compiled (``torch.compile``) view of a network, held outside the module tree.

    Assigning a compiled module as a submodule would register it (``state_dict`` keys ``..._orig_mod.*``);
    this holder is a plain object, so the owner's checkpoints keep ``net.<param>`` keys. The compiled callable
    shares the network's parameters, so optimizers, ``load_state_dict`` (fast SWA) and device moves made on
    the network are seen by it. Copies (``copy.deepcopy``, pickling) drop the compiled callable: a copy owns
    other parameters and must not run the original's graph; :meth:`get` then returns None.

    Args:
        net: the network to compile.
        mode: ``torch.compile`` mode (None = default).
        dynamic: ``torch.compile`` ``dynamic``.
    """

    def __init__(self, net: nn.Module, mode: str | None = None, dynamic: bool | None = False) -> None:
        self.mode = mode
        self.dynamic = dynamic
        self._net: nn.Module | None = net
        self._fn: Callable[..., Any] | None = torch.compile(net, mode=mode, dynamic=dynamic)

    def get(self, net: nn.Module) -> Callable[..., Any] | None:
        """The compiled callable when it was built for ``net`` (the same object), else None."""
        return self._fn if self._net is net else None

    def __deepcopy__(self, memo: dict) -> CompiledNet:
        clone = copy.copy(self)
        clone._net, clone._fn = None, None
        return clone

    def __getstate__(self) -> dict[str, Any]:
        return {"mode": self.mode, "dynamic": self.dynamic, "_net": None, "_fn": None}


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The original module of a compiled module (``OptimizedModule._orig_mod``), else ``module``."""
    return getattr(module, "_orig_mod", module)


def strip_compile_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every ``_orig_mod.`` path component removed (a compiled module's keys).

    Returns:
        A new dict; keys without the component are unchanged.
    """
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


class InferenceNet(nn.Module):
    """A network for inference with the speed plan applied: weights and inputs in the plan's memory format
    and, when ``plan.compile`` is on, the forward compiled (:class:`CompiledNet`). For benchmarks and
    predictors; checkpoints are saved from the plain network, never from this wrapper.

    Args:
        net: the network (converted in place to the plan's memory format).
        plan: the resolved plan (:func:`resolve_speed`).
    """

    def __init__(self, net: nn.Module, plan: SpeedPlan) -> None:
        super().__init__()
        self.net = convert_module(net, plan)
        self.plan = plan
        self._compiled = CompiledNet(net, plan.compile_mode, plan.compile_dynamic) if plan.compile else None

    def forward(self, x: torch.Tensor) -> Any:
        fn = self._compiled.get(self.net) if self._compiled is not None else None
        return (self.net if fn is None else fn)(convert_input(x, self.plan))

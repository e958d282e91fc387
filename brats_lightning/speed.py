"""Speed switches for training: memory format, norm layout, cuDNN autotuning, ``torch.compile``, threads.

Issue 7. Each switch is a key of the ``speed`` config group (conf/speed/default.yaml) that takes ``auto`` or
an explicit value. :func:`resolve_speed` turns the config into a :class:`SpeedPlan` for the device and
precision that will train, with the reason for every automatic choice; :class:`~brats_lightning.module.
BratsModule` applies the plan in ``configure_model`` (before the optimizer exists) and train.py passes the
cuDNN choice to the Trainer and sets the thread count. What ``auto`` picks, and why (docs/method.md "Measured
anchors"; benchmarks/RESULTS.md; docs/performance.md):

- ``memory_format``: on the CPU it depends on the precision and the CPU's vector ISA
  (``torch.backends.cpu.get_cpu_capability()``, :func:`cpu_memory_format`): ``channels_last_3d`` (NDHWC) for
  bf16 and for fp32 on AVX512 CPUs (measured on a bf16 Xeon: faster oneDNN 3D convolutions), and for fp32
  inference on AVX2; ``contiguous`` for fp32 training on AVX2 and other CPUs (no gain measured on an AVX2
  AMD EPYC). ``contiguous`` on CUDA, where channels_last_3d made the H200 step slower (60 vs 42 ms compiled,
  106 vs 82 ms eager), and on other devices.
- ``contiguous_norms``: with channels_last_3d on CPU, GroupNorm / InstanceNorm run on contiguous copies
  (forward hooks, :func:`set_contiguous_norms`): the channels-last GroupNorm kernel is up to 19x slower in
  bf16 (8 channels, 64^3, forward + backward), enough to make channels_last_3d a loss for pipeline A. Off for
  fp32 inference, where the two copies per norm layer cost more than the native channels-last norm.
- ``cudnn_benchmark``: on for CUDA (one autotuning pass per input shape; training crops have one shape),
  off elsewhere and whenever the trainer is deterministic.
- ``compile``: ``torch.compile`` of the network's training forward on CUDA (docs/method.md: 82 -> 42 ms per
  w=48 step in fp16); off on CPU, where the compilation time (minutes on 2 cores) outweighs what a
  few-minute demo gains.
- ``num_threads``: left to torch (one per core) unless set; ``auto`` counts the cores free at start
  (:func:`free_cores`: the CPUs this process may use, less the cores' worth of CPU time other processes
  spent in a short ``/proc/stat`` sample) and uses that many. Threads on busy cores are far slower (OpenMP
  regions wait for descheduled threads: 6x at load 4.5, docs/performance.md); :func:`apply_threads` logs
  one line with the count and, when torch's default meets busy cores, how to set it.

Not provided, on purpose: a fused GroupNorm/InstanceNorm + ReLU layer (eager PyTorch has no fused kernel to
call; ReLU is 1-3% of a CPU demo step, and a Python ``autograd.Function`` would still make the same memory
passes; inductor already fuses the norm's elementwise tail with the ReLU when ``compile`` is on), and CUDA
graphs (``compile_mode: reduce-overhead``) as a default: they can't be tested on the CPU-only machine this
suite is built on; the mode is passed through, untested, for those who want to try it.

The compiled callable is kept outside the module tree (see :class:`CompiledNet`), so checkpoints keep
``net.<param>`` keys with no ``_orig_mod.`` and the inference loader reads them unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection, Mapping
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
        contiguous_norms: "auto" (on with channels_last_3d on the CPU), True or False: with a
            channels_last_3d network, run GroupNorm / InstanceNorm on contiguous copies (forward hooks;
            parameters and checkpoints unchanged). oneDNN's channels-last GroupNorm is up to 19x slower than
            the contiguous kernel in bf16 on the CPU, which made channels_last_3d a loss for pipeline A.
        num_threads: torch CPU threads for training: None (torch's default, one per core), "auto" (the cores
            free at start, :func:`free_cores`) or a count. 1 is much faster when several trainings share the
            cores: OpenMP regions then wait for descheduled threads.
    """

    memory_format: str = AUTO
    cudnn_benchmark: bool | str = AUTO
    compile: bool | str = AUTO
    compile_mode: str | None = None
    compile_dynamic: bool | None = False
    contiguous_norms: bool | str = AUTO
    num_threads: int | str | None = None

    def __post_init__(self) -> None:
        if self.memory_format != AUTO and self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"speed.memory_format={self.memory_format!r}: expected auto, "
                             f"{' or '.join(MEMORY_FORMATS)} (conf/speed/default.yaml)")
        object.__setattr__(self, "cudnn_benchmark", _auto_or_bool("cudnn_benchmark", self.cudnn_benchmark))
        object.__setattr__(self, "compile", _auto_or_bool("compile", self.compile))
        object.__setattr__(self, "contiguous_norms", _auto_or_bool("contiguous_norms", self.contiguous_norms))
        threads = self.num_threads
        if isinstance(threads, str) and threads.lower() == AUTO:
            object.__setattr__(self, "num_threads", AUTO)
        elif threads is not None and (isinstance(threads, bool) or not str(threads).isdigit()
                                      or int(threads) < 1):
            raise ValueError(f"speed.num_threads={threads!r}: expected null, auto or a positive integer")
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
        contiguous_norms: run the norm layers of a channels_last_3d network on contiguous copies.
        num_threads: torch CPU threads (None: leave torch's setting; "auto": the cores free when
            :func:`apply_threads` runs).
        inference: resolved for inference (no backward: no norm hooks are needed for InstanceNorm's
            channels-last backward).
        reasons: switch -> why it has its value (logged once).
    """

    device_type: str
    precision: str
    memory_format: str = "contiguous"
    cudnn_benchmark: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_dynamic: bool | None = False
    contiguous_norms: bool = False
    num_threads: int | str | None = None
    inference: bool = False
    reasons: tuple[tuple[str, str], ...] = ()

    @property
    def torch_memory_format(self) -> torch.memory_format:
        """The ``torch.memory_format`` of :attr:`memory_format`."""
        return MEMORY_FORMATS[self.memory_format]

    def describe(self) -> str:
        """One line: every switch with its value and reason."""
        compiled = f"True (mode {self.compile_mode or 'default'})" if self.compile else False
        values = {"memory_format": self.memory_format, "contiguous_norms": self.contiguous_norms,
                  "cudnn_benchmark": self.cudnn_benchmark, "compile": compiled}
        if self.num_threads is not None:
            values["num_threads"] = self.num_threads
        why = dict(self.reasons)
        return "; ".join(f"{k}={v} ({why[k]})" if k in why else f"{k}={v}" for k, v in values.items())


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH (inductor needs one to compile for the CPU)."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


HALF_CPU_PRECISIONS = ("bf16-mixed", "bf16", "bf16-true", "16-mixed", "16", "16-true")
"""Lightning precisions that compute in a 16-bit type (on the CPU: bf16)."""


def cpu_memory_format(precision: str, capability: str, inference: bool = False) -> tuple[str, str]:
    """``auto``'s memory format on the CPU, and why, from what was measured per precision and vector ISA.

    Measured (docs/performance.md, benchmarks/RESULTS.md; EquiUnet w=8, 64^3 training crops, 80x96x80
    inference boxes): on a bf16 Xeon (AVX512 with native bf16), channels_last_3d with contiguous norms made
    the bf16 training step 1.22x (pipeline A) / 1.35x (B) faster, fp32 1.11x (A), and bf16 inference 1.22x;
    on an AVX2 AMD EPYC (no native bf16, so fp32; 1 thread, CPU time), the fp32 training step 1.15x (A) /
    1.47x (B, batch 3) faster, and the predictor's fp32 inference with the native norms took 0.79x (A) /
    1.0-1.15x (B) the time of a plain loop over a contiguous network. CPUs of other kinds (ARM, no AVX2)
    were not measured: contiguous.

    Args:
        precision: the Lightning precision (or "fp32" / "bf16" for inference).
        capability: ``torch.backends.cpu.get_cpu_capability()`` ("AVX2", "AVX512", "DEFAULT", ...).
        inference: resolve for inference (forward only) instead of training.

    Returns:
        ("channels_last_3d" or "contiguous", the reason).
    """
    if precision in HALF_CPU_PRECISIONS or precision == "bf16":
        return "channels_last_3d", "auto: bf16 on CPU, 1.22-1.35x faster on a bf16 Xeon (docs/performance.md)"
    if capability.startswith("AVX512"):
        return "channels_last_3d", f"auto: fp32 on {capability}, 1.11x faster on a Xeon (docs/performance.md)"
    if capability == "AVX2":
        gain = "inference A 1.27x" if inference else "training A 1.15x, B 1.47x"
        return "channels_last_3d", f"auto: fp32 on AVX2, {gain} faster on an AMD EPYC (docs/performance.md)"
    return "contiguous", f"auto: not measured on a {capability} CPU"


def resolve_speed(
    config: Mapping[str, Any] | SpeedConfig | None,
    device_type: str,
    precision: str | int = "32-true",
    deterministic: bool = False,
    inference: bool = False,
    cpu_capability: str | None = None,
) -> SpeedPlan:
    """Resolve the ``auto`` switches of ``config`` for ``device_type`` and ``precision``.

    Args:
        config: the ``speed`` config (None: defaults, i.e. everything ``auto``).
        device_type: where training runs ("cpu", "cuda", "mps", ...).
        precision: the Lightning precision that will be used (after the CPU fallback of
            :func:`brats_lightning.precision.resolve_precision`); for inference "fp32", "bf16" or "fp16".
        deterministic: the trainer's ``deterministic`` flag (cuDNN autotuning is then left off).
        inference: resolve for inference (forward only: memory format and norms per :func:`cpu_memory_format`,
            no InstanceNorm hooks).
        cpu_capability: the CPU's vector ISA (None: ``torch.backends.cpu.get_cpu_capability()``).

    Returns:
        The plan, with a reason for every automatic choice.

    Raises:
        ValueError: ``compile: true`` on the CPU without a C++ compiler (inductor needs one).
    """
    cfg = SpeedConfig.from_mapping(config)
    precision = str(precision)
    reasons: list[tuple[str, str]] = []

    memory_format = cfg.memory_format
    half = precision in HALF_CPU_PRECISIONS or precision in ("bf16", "fp16")
    if memory_format == AUTO:
        if device_type == "cpu":
            capability = cpu_capability or torch.backends.cpu.get_cpu_capability()
            memory_format, why = cpu_memory_format(precision, capability, inference)
            reasons.append(("memory_format", why))
        else:
            memory_format = "contiguous"
            why = ("auto: channels_last_3d slowed the H200 step (docs/performance.md)"
                   if device_type == "cuda"
                   else f"auto: not measured on {device_type}")
            reasons.append(("memory_format", why))

    norms = cfg.contiguous_norms
    if norms == AUTO:
        norms = memory_format == "channels_last_3d" and device_type == "cpu" and (half or not inference)
        if memory_format == "channels_last_3d":
            why = ("auto: channels-last GroupNorm is slow on CPU (bf16 up to 19x)" if norms
                   else "auto: fp32 inference, the native norms are faster than the copies"
                   if device_type == "cpu" else f"auto: not measured on {device_type}")
            reasons.append(("contiguous_norms", why))

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
        why = ("auto: on for CUDA (docs/method.md: 82 -> 42 ms per w=48 fp16 step)" if compiled
               else "auto: off on CPU (compilation takes minutes on a few cores)" if device_type == "cpu"
               else f"auto: not tested on {device_type}")
        reasons.append(("compile", why))
    if compiled and device_type == "cpu" and not has_cxx_compiler():
        raise ValueError("speed.compile=true on the CPU needs a C++ compiler (g++ / clang++) for inductor; "
                         "none is on PATH: install one or set speed.compile=false")
    return SpeedPlan(device_type=device_type, precision=precision, memory_format=memory_format,
                     cudnn_benchmark=bool(benchmark), compile=bool(compiled), compile_mode=cfg.compile_mode,
                     compile_dynamic=cfg.compile_dynamic,
                     contiguous_norms=bool(norms) and memory_format == "channels_last_3d",
                     num_threads=cfg.num_threads if cfg.num_threads in (None, AUTO) else int(cfg.num_threads),
                     inference=inference, reasons=tuple(reasons))


AMP_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
"""Autocast dtype (None: none) -> the precision name of an inference plan."""


def inference_plan(device_type: str, amp_dtype: torch.dtype | None,
                   config: Mapping[str, Any] | None = None) -> SpeedPlan:
    """The speed plan for inference under ``amp_dtype`` autocast (docs/method.md Inference): ``auto``
    resolved for a forward-only network, never compiled unless ``config`` says so (every case has its own
    brain-box shape)."""
    return resolve_speed({"compile": False, **(config or {})}, device_type, AMP_NAMES[amp_dtype],
                         inference=True)


NORM_TYPES = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_HOOKS_ATTR = "_speed_contiguous_norm_hooks"


class _ToChannelsLast(torch.autograd.Function):
    """``x.contiguous(memory_format=channels_last_3d)`` whose backward hands a contiguous gradient on.

    A plain ``.contiguous(memory_format=...)`` passes the channels-last gradient of the next convolution
    through unchanged, and InstanceNorm3d's CPU backward is wrong for channels-last gradients at batch
    size 1 (torch 2.13; tests/test_speed.py pins it), so the norm must receive a contiguous one.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the norm's input as a contiguous tensor."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def _channels_last_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: a 5-D norm output back in channels_last_3d (what the next convolution wants), with a
    contiguous gradient for the norm's backward (:class:`_ToChannelsLast`)."""
    if isinstance(output, torch.Tensor) and output.ndim == 5:
        return _ToChannelsLast.apply(output)
    return output


def set_contiguous_norms(net: nn.Module, enabled: bool, types: tuple[type, ...] = NORM_TYPES) -> int:
    """Install (or remove) the contiguous-norm hooks on the norm layers of ``net`` of the given ``types``.

    The norm then computes on a contiguous copy of its input and hands a channels_last_3d output on; hooks
    change no parameter or ``state_dict`` key. Hooks of earlier calls are removed first (no duplicates).

    Returns:
        The number of norm layers hooked.
    """
    count = 0
    for module in net.modules():
        if not isinstance(module, NORM_TYPES):
            continue
        handles = module.__dict__.pop(_HOOKS_ATTR, None)
        if handles is not None:
            for handle in handles:
                handle.remove()
        if enabled and isinstance(module, types):
            module.__dict__[_HOOKS_ATTR] = (module.register_forward_pre_hook(_contiguous_input),
                                            module.register_forward_hook(_channels_last_output))
            count += 1
    return count


def convert_module(net: nn.Module, plan: SpeedPlan) -> nn.Module:
    """Put ``net``'s parameters and buffers in the plan's memory format and install the contiguous-norm
    hooks (in place; returns ``net``).

    With channels_last_3d, the hooks go on every norm layer when ``plan.contiguous_norms`` is on, and on the
    InstanceNorm layers in any case for training: their CPU backward is wrong for channels-last gradients at
    batch size 1 (torch 2.13), and the hooks hand them contiguous ones (inference has no backward).
    Parameters keep their identity (``Module.to`` replaces ``.data``), so an existing optimizer still works.
    """
    net.to(memory_format=plan.torch_memory_format)
    channels_last = plan.memory_format == "channels_last_3d"
    types = NORM_TYPES if plan.contiguous_norms else () if plan.inference else INSTANCE_NORMS
    set_contiguous_norms(net, channels_last and bool(types), types)
    return net


PROC_STAT = "/proc/stat"


def _cpu_times(cpus: Collection[int]) -> dict[int, tuple[int, int]] | None:
    """(busy, total) jiffies of each CPU in ``cpus`` from /proc/stat (Linux); None where it is unreadable."""
    try:
        lines = open(PROC_STAT).read().splitlines()  # noqa: SIM115 (a one-shot read)
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            # user nice system idle iowait irq softirq steal (guest time is already counted in user)
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times or None


def busy_cores(cpus: Collection[int], seconds: float = 0.5) -> float:
    """Cores' worth of CPU time that processes spent on ``cpus`` over ``seconds`` (/proc/stat samples;
    where /proc/stat is unreadable, the 1-minute load average, at most ``len(cpus)``)."""
    before = _cpu_times(cpus)
    if before is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return min(float(load), float(len(cpus)))
    time.sleep(seconds)
    after = _cpu_times(cpus) or before
    busy = 0.0
    for cpu, (busy0, total0) in before.items():
        busy1, total1 = after.get(cpu, (busy0, total0))
        if total1 > total0:
            busy += (busy1 - busy0) / (total1 - total0)
    return busy


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity; every CPU where affinity is unsupported)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def free_cores(seconds: float = 0.5) -> tuple[int, int, float]:
    """(free, usable, busy) cores: the usable CPUs less what other processes keep busy (at least 1 free).

    A core counts as free when less than half of it is busy: ``max(1, floor(usable - busy + 0.5))``.
    """
    cpus = usable_cpus()
    busy = busy_cores(cpus, seconds)
    return max(1, int(len(cpus) - busy + 0.5)), len(cpus), busy


def apply_threads(plan: SpeedPlan, seconds: float = 0.5) -> int:
    """Set torch's CPU thread count for ``plan`` and log one line saying what was chosen; returns the
    previous count.

    ``plan.num_threads``: a count is set as it is; ``"auto"`` samples the free cores (:func:`free_cores`) and
    uses that many; None leaves torch's count (one per core), with a warning when fewer cores are free.
    """
    previous = torch.get_num_threads()
    if isinstance(plan.num_threads, int):
        torch.set_num_threads(plan.num_threads)
        log.info("threads: %d (speed.num_threads=%d)", plan.num_threads, plan.num_threads)
        return previous
    free, usable, busy = free_cores(seconds)
    seen = f"{free} of {usable} usable core(s) free at start ({busy:.1f} busy over {seconds:g} s)"
    if plan.num_threads == AUTO:
        torch.set_num_threads(free)
        log.info("threads: %s -> torch uses %d thread(s) (speed.num_threads=auto); set speed.num_threads=N "
                 "for a fixed count (results depend on it)", seen, free)
    elif free < previous:
        log.warning("threads: %s, torch uses %d: threads on busy cores wait for each other (up to 6x "
                    "slower, docs/performance.md); set speed.num_threads=%d or speed.num_threads=auto", seen,
                    previous, free)
    else:
        log.info("threads: %s, torch uses %d (speed.num_threads=N to change it)", seen, previous)
    return previous


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

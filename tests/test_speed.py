"""Tests of brats_lightning/speed.py and the speed switches as BratsModule applies them.

Every switch is checked against the plain path: forward logits, and one training step's loss and
gradients, within the precision's tolerance (fp32: 1e-4 relative; bf16 autocast: as close to the fp32 result
as the plain bf16 path, see :func:`assert_as_close_as_plain`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from brats_lightning import speed
from brats_lightning.data.datamodule import collate_cases
from brats_lightning.module import BratsModule
from brats_lightning.precision import cpu_supports_bf16

CONF = Path(__file__).resolve().parents[1] / "conf"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
# training_step logs; without a Trainer Lightning warns and skips the logging.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def pipeline_config(name: str = "A") -> dict:
    cfg = OmegaConf.create({"pipeline": OmegaConf.load(CONF / "pipeline" / f"{name}.yaml")})
    cfg.pipeline.epochs = 1
    cfg.pipeline.augment = None  # identical batches for both paths
    cfg.pipeline.optimizer = {"name": "sgd", "lr": 0.1}
    return OmegaConf.to_container(cfg, resolve=True)["pipeline"]


def make_module(speed_cfg: dict, pipeline: str = "A", width: int = 4, stage: bool = False) -> BratsModule:
    """BratsModule with an EquiUnet, or (``stage``) a single conv-norm-ReLU stage 4 -> width -> 3 (the
    compile test: inductor compiles it in seconds, the whole U-Net takes minutes on 2 cores)."""
    torch.manual_seed(0)
    pipe = pipeline_config(pipeline)
    model = {"_target_": "brats_lightning.models.EquiUnet", "width": width, "norm": pipe["norm"]}
    if stage:
        model = {"_target_": "brats_lightning.models.blocks.Stage", "widths": [4, width, 3],
                 "norm": pipe["norm"]}
    return BratsModule(model, pipe, speed=speed_cfg)


def make_batch(size: int = 24, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 4, size, size, size, generator=g)
    target = torch.rand(1, 3, size, size, size, generator=g) > 0.6
    return {"image": image.to(device), "target": target.to(device), "case_id": ["c0"]}


def step(module: BratsModule, batch: dict, dtype: torch.dtype | None, device: str) -> tuple:
    """Eval logits, then one training step's loss and gradients (as Lightning's automatic optimization)."""
    module.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = module(batch["image"]).float()
    module.train()
    module.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in module.named_parameters()}
    return logits, loss.detach().float(), grads


def assert_same(a: tuple, b: tuple, tol: float) -> None:
    """Logits, loss and every gradient equal within ``tol`` relative to the reference's scale."""
    (la, lossa, ga), (lb, lossb, gb) = a, b
    assert float((la - lb).abs().max()) <= tol * float(lb.abs().max())
    assert abs(float(lossa) - float(lossb)) <= tol * max(1.0, abs(float(lossb)))
    assert ga.keys() == gb.keys()
    for name in gb:
        err = float((ga[name] - gb[name]).norm())
        scale = float(gb[name].norm())
        assert err <= tol * scale + 1e-12, (name, err, scale)


def _distances(result: tuple, reference: tuple) -> list[float]:
    """Relative distances of (logits, loss, all gradients flattened) from a reference result."""
    flat = [torch.cat([g.flatten() for g in r[2].values()]) for r in (result, reference)]
    return [float((result[0] - reference[0]).abs().max() / reference[0].abs().max()),
            abs(float(result[1] - reference[1])) / max(1.0, abs(float(reference[1]))),
            float((flat[0] - flat[1]).norm() / flat[1].norm())]


def assert_as_close_as_plain(fast: tuple, plain: tuple, reference: tuple) -> None:
    """For 16-bit autocast: the switched path is as close to the fp32 reference as the plain 16-bit path
    (at most twice its distance, plus 1e-3). bf16 gradients of a tiny network on random data are 10-20% off
    fp32 either way, so a direct fast-vs-plain tolerance would have to be that loose."""
    for got, allowed in zip(_distances(fast, reference), _distances(plain, reference), strict=True):
        assert got <= 2 * allowed + 1e-3, (got, allowed)


# ------------------------------------------------------------------------------------------ resolution
def test_auto_choices_per_device() -> None:
    cpu = speed.resolve_speed(None, "cpu", "32-true", cpu_capability="AVX2")
    assert (cpu.memory_format, cpu.cudnn_benchmark, cpu.compile) == ("channels_last_3d", False, False)
    assert cpu.contiguous_norms and cpu.num_threads is None
    cpu_bf16 = speed.resolve_speed(None, "cpu", "bf16-mixed", cpu_capability="AVX512")
    assert cpu_bf16.memory_format == "channels_last_3d"
    cuda = speed.resolve_speed({}, "cuda", "16-mixed")
    assert (cuda.memory_format, cuda.cudnn_benchmark, cuda.compile) == ("contiguous", True, True)
    assert not cuda.contiguous_norms  # only meaningful with channels_last_3d
    forced = speed.resolve_speed({"memory_format": "channels_last_3d"}, "cuda", "16-mixed")
    assert not forced.contiguous_norms and "not measured on cuda" in dict(forced.reasons)["contiguous_norms"]
    assert speed.resolve_speed({}, "cuda", "16-mixed", deterministic=True).cudnn_benchmark is False
    mps = speed.resolve_speed({}, "mps", "32-true")
    assert (mps.memory_format, mps.cudnn_benchmark, mps.compile) == ("contiguous", False, False)
    reasons = dict(cuda.reasons)
    assert set(reasons) == {"memory_format", "cudnn_benchmark", "compile"}
    assert "docs/method.md" in reasons["compile"]
    assert "memory_format=contiguous" in cuda.describe() and "compile=True (mode default)" in cuda.describe()


@pytest.mark.parametrize(("precision", "capability", "inference", "expected"), [
    ("bf16-mixed", "AVX512", False, ("channels_last_3d", True)),   # bf16 Xeon: 1.22x (A), 1.35x (B)
    ("bf16", "AVX512", True, ("channels_last_3d", True)),          # bf16 inference 1.22x; GN 19x slower
    ("32-true", "AVX512", False, ("channels_last_3d", True)),      # fp32 Xeon: 1.11x (A)
    ("32-true", "AVX2", False, ("channels_last_3d", True)),        # AMD EPYC fp32: A 1.15x, B 1.47x
    ("fp32", "AVX2", True, ("channels_last_3d", False)),           # fp32 inference: native norms (A 1.27x)
    ("fp32", "AVX512", True, ("channels_last_3d", False)),
    ("32-true", "DEFAULT", False, ("contiguous", False)),          # not measured (ARM, no AVX2)
    ("fp32", "DEFAULT", True, ("contiguous", False)),
])
def test_auto_memory_format_per_cpu_capability_and_precision(precision, capability, inference, expected):
    plan = speed.resolve_speed(None, "cpu", precision, inference=inference, cpu_capability=capability)
    assert (plan.memory_format, plan.contiguous_norms) == expected
    why = dict(plan.reasons)["memory_format"]
    assert (capability in why or "bf16" in why or "not measured" in why) and why.startswith("auto")
    assert plan.inference is inference


def test_inference_plan_follows_the_autocast_dtype(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    fp32 = speed.inference_plan("cpu", None)
    assert (fp32.precision, fp32.memory_format, fp32.contiguous_norms, fp32.compile, fp32.inference) == (
        "fp32", "channels_last_3d", False, False, True)
    assert speed.inference_plan("cpu", torch.bfloat16).contiguous_norms
    assert speed.inference_plan("cpu", None, {"memory_format": "contiguous"}).memory_format == "contiguous"
    cuda = speed.inference_plan("cuda", torch.float16)
    assert (cuda.memory_format, cuda.compile) == ("contiguous", False)


def test_explicit_values_win_over_auto() -> None:
    plan = speed.resolve_speed({"memory_format": "contiguous", "cudnn_benchmark": "true", "compile": False},
                               "cpu", "32-true")
    assert (plan.memory_format, plan.cudnn_benchmark, plan.compile) == ("contiguous", True, False)
    assert plan.reasons == ()  # nothing was automatic
    plan = speed.resolve_speed({"memory_format": "channels_last_3d", "compile": "false"}, "cuda", "16-mixed")
    assert (plan.memory_format, plan.compile) == ("channels_last_3d", False)
    plan = speed.resolve_speed({"memory_format": "contiguous", "contiguous_norms": True, "num_threads": 1},
                               "cpu", "32-true")
    assert not plan.contiguous_norms and plan.num_threads == 1  # no channels_last network, no hooks


def test_config_group_matches_the_dataclass_defaults() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "speed" / "default.yaml"))
    assert speed.SpeedConfig.from_mapping(yaml) == speed.SpeedConfig()
    assert "speed: default" in (CONF / "train.yaml").read_text()


@pytest.mark.parametrize("bad, message", [
    ({"memory_format": "nhwc"}, "memory_format"), ({"compile": "yes"}, "compile"),
    ({"cudnn_benchmark": 2}, "cudnn_benchmark"), ({"compile_mode": "fast"}, "compile_mode"),
    ({"fused_norm": True}, "unknown speed option"), ({"num_threads": 0}, "num_threads"),
    ({"contiguous_norms": "maybe"}, "contiguous_norms"),
])
def test_bad_config_is_refused(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        speed.SpeedConfig.from_mapping(bad)


def test_compile_on_cpu_without_a_compiler_is_refused(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / c++ / clang++ there
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        speed.resolve_speed({"compile": True}, "cpu", "32-true")
    assert speed.resolve_speed({"compile": True}, "cuda", "16-mixed").compile


# ------------------------------------------------------------------------------- compiled-net holder
def test_compiled_net_is_not_a_submodule_and_copies_drop_it() -> None:
    module = make_module({"compile": False}, width=4)
    keys = list(module.state_dict())
    module._compiled = speed.CompiledNet(module.net)  # torch.compile is lazy: nothing compiles here
    assert list(module.state_dict()) == keys and all(k.startswith("net.") for k in keys if "loss" not in k)
    assert not any("_orig_mod" in k for k in module.state_dict())
    assert module._compiled.get(module.net) is not None
    clone = copy.deepcopy(module)
    assert clone._compiled.get(clone.net) is None and clone._compiled.get(module.net) is None
    assert module._compiled.get(module.net) is not None  # the original keeps its compiled view


def test_strip_compile_prefix_gives_the_plain_keys() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.GroupNorm(1, 2))
    compiled = torch.compile(net)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert list(speed.strip_compile_prefix(compiled.state_dict())) == list(net.state_dict())
    assert speed.unwrap_compiled(compiled) is net and speed.unwrap_compiled(net) is net


def test_contiguous_norm_hooks_keep_parameters_and_are_idempotent() -> None:
    module = make_module({}, width=4)
    keys = list(module.state_dict())
    n_norms = sum(isinstance(m, speed.NORM_TYPES) for m in module.net.modules())
    assert n_norms == 17  # 2 per encoder stage (4), bottom 2, bottom_2 1, 2 per decoder stage (3)
    assert speed.set_contiguous_norms(module.net, True) == n_norms
    assert speed.set_contiguous_norms(module.net, True) == n_norms  # again: still one hook pair per norm
    norm = module.net.encoder1.block1.norm
    assert len(norm._forward_pre_hooks) == 1 and len(norm._forward_hooks) == 1
    assert list(module.state_dict()) == keys
    x = torch.randn(1, 4, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    seen = []
    handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    out = module.net.encoder1.block1(x)
    handle.remove()
    assert seen == [True] and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert speed.set_contiguous_norms(module.net, False) == 0
    assert not norm._forward_pre_hooks and not norm._forward_hooks
    copy.deepcopy(module)  # hooks are module-level functions: copies and pickles work


def test_instance_norm_channels_last_bug() -> None:
    """Why InstanceNorm layers of a channels_last_3d network are always hooked: torch 2.13's CPU backward of
    InstanceNorm3d is wrong for a channels-last gradient at batch size 1 (batch 2 is right; GroupNorm is
    right). When a torch upgrade fixes it, this test fails: then the forced hooks can go."""
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm3d(8, affine=True).double()
    x = torch.randn(1, 8, 8, 8, 8, dtype=torch.double, requires_grad=True)
    grad_out = torch.randn(1, 8, 8, 8, 8, dtype=torch.double)
    (expected,) = torch.autograd.grad(norm(x), x, grad_out)
    (wrong,) = torch.autograd.grad(norm(x), x, grad_out.contiguous(memory_format=torch.channels_last_3d))
    assert float((wrong - expected).abs().max()) > 1.0
    # the hooks hand the norm a contiguous gradient: exact again
    speed.set_contiguous_norms(torch.nn.Sequential(norm), True)
    xc = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    out = norm(xc)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    (fixed,) = torch.autograd.grad(out, xc, grad_out.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(fixed, expected, rtol=1e-12, atol=1e-12)


def test_apply_threads_sets_and_reports_the_previous_count() -> None:
    before = torch.get_num_threads()
    try:
        assert speed.apply_threads(speed.resolve_speed({"num_threads": 1}, "cpu")) == before
        assert torch.get_num_threads() == 1
        assert speed.apply_threads(speed.resolve_speed({}, "cpu"), 0.05) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("AUTO", "auto"), (2, 2), ("3", 3),
                                                 (None, None)])
def test_num_threads_values(value, expected) -> None:
    assert speed.resolve_speed({"num_threads": value}, "cpu").num_threads == expected


def _write_stat(path: Path, jiffies: dict[int, tuple[int, int]]) -> None:
    """A /proc/stat with (busy, idle) jiffies per CPU: busy as user time, idle split into idle + iowait."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{c} {b} 0 0 {i - i // 2} {i // 2} 0 0 0 0 0" for c, (b, i) in jiffies.items()]
    path.write_text("\n".join([*lines, "intr 0", "ctxt 0"]) + "\n")


def test_busy_cores_from_two_proc_stat_samples(tmp_path, monkeypatch) -> None:
    """Hand-worked: CPU 0 busy 90 of 100 jiffies, CPU 1 busy 10 of 100, CPU 2 (not usable) ignored."""
    stat = tmp_path / "stat"
    monkeypatch.setattr(speed, "PROC_STAT", str(stat))
    _write_stat(stat, {0: (1000, 5000), 1: (2000, 4000), 2: (0, 0)})
    monkeypatch.setattr(speed.time, "sleep", lambda s: _write_stat(stat, {0: (1090, 5010), 1: (2010, 4090),
                                                                          2: (100, 0)}))
    assert speed.busy_cores({0, 1}) == pytest.approx(1.0)
    monkeypatch.setattr(speed, "PROC_STAT", str(tmp_path / "missing"))  # no /proc: the load average
    monkeypatch.setattr(speed.os, "getloadavg", lambda: (7.5, 0.0, 0.0))
    assert speed.busy_cores({0, 1}) == 2.0


@pytest.mark.parametrize(("usable", "busy", "free"), [(2, 0.1, 2), (2, 0.5, 2), (2, 0.6, 1), (2, 1.9, 1),
                                                      (2, 2.0, 1), (8, 3.2, 5), (1, 0.0, 1)])
def test_free_cores_rounding(monkeypatch, usable, busy, free) -> None:
    monkeypatch.setattr(speed, "usable_cpus", lambda: set(range(usable)))
    monkeypatch.setattr(speed, "busy_cores", lambda cpus, seconds: busy)
    assert speed.free_cores() == (free, usable, busy)


def _busy_neighbour(cpu: int, seconds: float) -> subprocess.Popen:
    """A process that spins on ``cpu`` for at most ``seconds``."""
    code = (f"import os, time; os.sched_setaffinity(0, {{{cpu}}}); end = time.time() + {seconds}\n"
            "while time.time() < end: pass")
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/stat").exists(),
                    reason="needs Linux CPU affinity and /proc/stat")
def test_auto_threads_leave_a_core_held_by_a_busy_neighbour(caplog) -> None:
    """A real busy loop on every usable CPU but one: ``auto`` then picks 1 thread (one log line)."""
    cpus = sorted(speed.usable_cpus())
    if len(cpus) < 2:
        pytest.skip("needs 2 usable CPUs")
    neighbours = [_busy_neighbour(cpu, 8.0) for cpu in cpus[1:]]
    before = torch.get_num_threads()
    try:
        time.sleep(0.5)  # the neighbours are spinning
        free, usable, busy = speed.free_cores(0.5)
        assert usable == len(cpus) and busy >= len(cpus) - 1.5 and free == 1
        with caplog.at_level(logging.INFO, logger="brats_lightning.speed"):
            speed.apply_threads(speed.resolve_speed({"num_threads": "auto"}, "cpu"))
        assert torch.get_num_threads() == 1
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("threads:")]
        assert f"1 of {len(cpus)} usable core(s) free" in line and "speed.num_threads=N" in line
        caplog.clear()
        torch.set_num_threads(len(cpus))
        with caplog.at_level(logging.INFO, logger="brats_lightning.speed"):
            speed.apply_threads(speed.resolve_speed({}, "cpu"))  # torch's default: a warning, no change
        assert torch.get_num_threads() == len(cpus)
        (record,) = [r for r in caplog.records if r.getMessage().startswith("threads:")]
        assert record.levelname == "WARNING" and "speed.num_threads=1" in record.getMessage()
    finally:
        for process in neighbours:
            process.kill()
            process.wait()
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ equivalences
BF16 = torch.bfloat16
CASES = [("A", "32-true", None, True), ("B", "32-true", None, True), ("A", "bf16-mixed", BF16, True),
         ("B", "bf16-mixed", BF16, True), ("A", "32-true", None, False), ("B", "32-true", None, False)]


@functools.cache
def plain_result(pipeline: str, precision: str) -> tuple:
    """The contiguous network's step (shared by the cases; never modified)."""
    module = make_module({"memory_format": "contiguous", "compile": False}, pipeline)
    assert module.apply_speed("cpu", precision).memory_format == "contiguous"
    return step(module, make_batch(), BF16 if precision == "bf16-mixed" else None, "cpu")


@pytest.mark.parametrize("pipeline, precision, dtype, norms", CASES)
def test_channels_last_matches_the_plain_path(pipeline: str, precision: str, dtype, norms: bool) -> None:
    """channels_last_3d, with and without the contiguous-norm hooks, vs the contiguous network."""
    if dtype is torch.bfloat16 and not cpu_supports_bf16():
        pytest.skip("CPU without native bf16")
    fast = make_module({"memory_format": "channels_last_3d", "compile": False, "contiguous_norms": norms},
                       pipeline)
    plan = fast.apply_speed("cpu", precision)
    assert (plan.memory_format, plan.contiguous_norms) == ("channels_last_3d", norms)
    # InstanceNorm layers (pipeline B) are hooked in any case (see test_instance_norm_channels_last_bug)
    assert bool(fast.net.encoder1.block1.norm._forward_hooks) is (norms or pipeline == "B")
    conv = fast.net.encoder1.block1.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    result_fast = step(fast, make_batch(), dtype, "cpu")
    if dtype is None:
        assert_same(result_fast, plain_result(pipeline, precision), 1e-4)
    else:
        reference = plain_result(pipeline, "32-true")
        assert_as_close_as_plain(result_fast, plain_result(pipeline, precision), reference)


@pytest.mark.parametrize("device", DEVICES)
def test_cudnn_benchmark_matches_the_plain_path(device: str) -> None:
    batch = make_batch(device=device)
    before = torch.backends.cudnn.benchmark
    try:
        results = []
        for on in (False, True):
            module = make_module({"memory_format": "contiguous", "compile": False, "cudnn_benchmark": on},
                                 width=4).to(device)
            plan = module.apply_speed(device, "32-true")
            torch.backends.cudnn.benchmark = plan.cudnn_benchmark  # what Trainer(benchmark=...) sets
            assert plan.cudnn_benchmark is on
            results.append(step(module, batch, None, device))
    finally:
        torch.backends.cudnn.benchmark = before
    assert_same(results[1], results[0], 0.0 if device == "cpu" else 1e-4)


@pytest.mark.parametrize("pipeline", ["A", "B"])
def test_inference_net_matches_the_plain_network(pipeline: str) -> None:
    """The fp32 inference plan (channels_last_3d, native norms, no hooks at all) and the earlier one
    (contiguous norm hooks) give the plain network's logits."""
    plain = make_module({}, pipeline, width=4).net.eval()
    x = make_batch(16)["image"]
    with torch.no_grad():
        expected = plain(x)
    for norms in (False, True):
        fast = speed.InferenceNet(copy.deepcopy(plain), speed.resolve_speed(
            {"memory_format": "channels_last_3d", "compile": False, "contiguous_norms": norms}, "cpu", "fp32",
            inference=True)).eval()
        hooked = [m for m in fast.net.modules() if speed._HOOKS_ATTR in m.__dict__]
        assert bool(hooked) is norms
        with torch.no_grad():
            got = fast(x)
        assert fast.net.encoder1.block1.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class _Crops(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        batch = make_batch()
        return {"image": batch["image"][0], "target": batch["target"][0], "case_id": "c0"}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_matches_eager_and_checkpoints_stay_plain(tmp_path) -> None:
    """The one compile test: compiled (inductor) vs eager logits / loss / gradients, then a real Trainer step
    with compile + channels_last_3d, a checkpoint with plain ``net.*`` keys, and the inference loader
    reading it. The network is one conv-GroupNorm-ReLU stage: the module's compile plumbing is the same for
    any network, and the whole U-Net compiles for minutes on 2 cores (benchmarks/run_all.py --compile
    compares its compiled and eager first-step losses)."""
    from brats_lightning.runs import Run, load_network

    batch = make_batch()
    eager = make_module({"memory_format": "contiguous", "compile": False}, width=8, stage=True)
    fast = make_module({"memory_format": "channels_last_3d", "compile": True}, width=8, stage=True)
    eager.apply_speed("cpu", "32-true")
    plan = fast.apply_speed("cpu", "32-true")
    assert plan.compile and fast._compiled is not None
    expected = step(eager, batch, None, "cpu")
    # step() takes eval logits from the eager network (validation never compiles) and the loss / gradients
    # from the compiled training forward.
    got = step(fast, batch, None, "cpu")
    assert_same(got, expected, 1e-4)

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         precision="32-true", default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(_Crops(), batch_size=1, collate_fn=collate_cases)
    trainer.fit(fast, train_dataloaders=loader)
    assert fast.speed_plan is plan  # configure_model kept the plan (same device and precision)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(k.startswith("net.") for k in state) and not any("_orig_mod" in k for k in state)

    info = {"pipeline": "A", "model": "equiunet", "fold": 0, "normalization": "minmax",
            "label_convention": "brats2020", "channels": ["t1", "t1ce", "t2", "flair"],
            "model_config": fast.hparams["model_config"], "checkpoints": {"last": str(ckpt)}}
    (tmp_path / "run.json").write_text(json.dumps(info))
    net = load_network(Run(tmp_path / "run.json", info), "last")
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, fast.net.state_dict()[name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(net(batch["image"]), fast.eval()(batch["image"]), rtol=1e-4, atol=1e-5)

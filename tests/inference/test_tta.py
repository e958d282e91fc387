"""Properties of the TTA views (docs/method.md, Inference and Known traps)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from brats_lightning.inference.tta import (
    FLIP_VIEWS,
    PAPER_VIEWS,
    VIEWS,
    View,
    get_views,
    iter_view_probabilities,
    tta_predict,
)
from brats_lightning.precision import resolve_amp_dtype


class FirstThreeChannels(nn.Module):
    """A network whose logits are its input's first three channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3]


def _distinct(tensors: list[torch.Tensor]) -> int:
    groups: list[torch.Tensor] = []
    for t in tensors:
        if not any(g.shape == t.shape and torch.equal(g, t) for g in groups):
            groups.append(t)
    return len(groups)


@pytest.mark.parametrize("shape", [(8, 16, 24), (16, 16, 16)])
def test_sixteen_views_pairwise_distinct(shape):
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    outs = [v.forward(x) for v in VIEWS]
    assert len(VIEWS) == 16
    assert len({v.name for v in VIEWS}) == 16
    for (i, a), (j, b) in itertools.combinations(enumerate(outs), 2):
        assert not (a.shape == b.shape and torch.equal(a, b)), (VIEWS[i].name, VIEWS[j].name)


@pytest.mark.parametrize("views", [VIEWS, FLIP_VIEWS, PAPER_VIEWS])
@pytest.mark.parametrize("shape", [(8, 16, 24), (16, 16, 16)])
def test_inverse_undoes_forward_exactly(views, shape):
    x = torch.randn(3, 2, *shape, generator=torch.Generator().manual_seed(1))
    for v in views:
        y = v.forward(x)
        assert y.shape[-3:] == v.output_shape(shape)
        assert torch.equal(v.inverse(y), x), v.name


def test_view_sets():
    assert get_views("none") == (View(),)
    assert get_views("all") == VIEWS
    assert get_views("flips") == FLIP_VIEWS
    assert len(FLIP_VIEWS) == 8 and all(v.k == 0 for v in FLIP_VIEWS)
    x = torch.randn(1, 8, 16, 24, generator=torch.Generator().manual_seed(2))
    assert _distinct([v.forward(x) for v in FLIP_VIEWS]) == 8
    with pytest.raises(ValueError, match="unknown TTA view set"):
        get_views("rotations")


@pytest.mark.parametrize("shape", [(8, 16, 24), (16, 16, 16)])
def test_paper_views_hold_only_twelve_distinct(shape):
    """The paper's {no flip, flip x|y|z} x 4 rotations: flip x + k turns == flip y + (k+2) turns."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    assert len(PAPER_VIEWS) == 16
    assert _distinct([v.forward(x) for v in PAPER_VIEWS]) == 12
    for k in range(4):
        assert torch.equal(View((-3,), k).forward(x), View((-2,), (k + 2) % 4).forward(x))


def test_reference_inverse_order_rotates_four_views_by_180():
    """The reference code undid "flip then rotate" by flipping first: wrong for 4 of its 16 views."""
    x = torch.randn(16, 16, 8, generator=torch.Generator().manual_seed(4))

    def reference_inverse(view: View, y: torch.Tensor) -> torch.Tensor:
        if view.flip_dims:
            y = torch.flip(y, view.flip_dims)
        return torch.rot90(y, -view.k, (-3, -2))

    wrong = [v for v in PAPER_VIEWS if not torch.equal(reference_inverse(v, v.forward(x)), x)]
    assert sorted((v.flip_dims, v.k) for v in wrong) == [((-3,), 1), ((-3,), 3), ((-2,), 1), ((-2,), 3)]
    for v in wrong:
        assert torch.equal(reference_inverse(v, v.forward(x)), torch.rot90(x, 2, (-3, -2)))


@pytest.mark.parametrize("view_batch_size", [1, 3, 16])
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_tta_of_identity_network_is_exact_sigmoid(view_batch_size, precision):
    image = torch.randn(1, 4, 8, 16, 24, generator=torch.Generator().manual_seed(5)) * 3
    amp = resolve_amp_dtype("cpu", precision)
    probs = tta_predict(FirstThreeChannels(), image, VIEWS, view_batch_size, amp)
    assert probs.dtype == torch.float32 and probs.shape == (3, 8, 16, 24)
    assert torch.equal(probs, torch.sigmoid(image[0, :3]))


def test_tta_averages_views_of_an_orientation_sensitive_network():
    """A network that is not equivariant: the result is the mean of the per-view, back-mapped outputs."""
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 3, 3, padding=1).eval()
    image = torch.randn(1, 4, 8, 16, 8)
    expected = torch.stack([
        v.inverse(torch.sigmoid(conv(v.forward(image)))[0]) for v in VIEWS
    ]).double().mean(0).float()
    got = tta_predict(conv, image, VIEWS, 5, None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    per_view = list(iter_view_probabilities(conv, image, VIEWS, 5, None))
    assert len(per_view) == 16 and all(p.shape == (3, 8, 16, 8) for p in per_view)


def test_resolve_amp_dtype():
    assert resolve_amp_dtype("cpu", "fp32") is None
    assert resolve_amp_dtype("cuda", "auto") is torch.float16
    assert resolve_amp_dtype("cpu", "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_amp_dtype("cpu", "fp8")


def test_grad_mode_is_restored_between_views():
    """The caller's code between two yielded views runs with its own grad mode (not inference mode)."""
    image = torch.randn(1, 4, 8, 8, 8)
    modes = []
    for _ in iter_view_probabilities(FirstThreeChannels(), image, VIEWS[:3], 1, None):
        modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
    assert modes == [(True, False)] * 3


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_fast_inference_path_gives_the_earlier_probabilities(norm):
    """The predictor's per-case path with the fp32 inference plan (channels_last_3d, native norms: issue 18)
    gives the probabilities of the earlier plan (contiguous norm hooks), of contiguous weights, and of a
    plain loop over the bare network, one view at a time, for every view batch size."""
    import copy

    import numpy as np

    from brats_lightning.inference.predictor import predict_probabilities
    from brats_lightning.models import EquiUnet
    from brats_lightning.models.blocks import group_norm, instance_norm
    from brats_lightning.speed import InferenceNet, inference_plan

    torch.manual_seed(0)
    bare = EquiUnet(width=4, norm=group_norm if norm == "group" else instance_norm).eval()
    images = np.random.default_rng(0).standard_normal((4, 16, 24, 16), dtype=np.float32)
    x = torch.from_numpy(images)[None]
    views = (VIEWS[0], VIEWS[1], VIEWS[6], VIEWS[13])  # both view shapes, flips and turns
    with torch.no_grad():
        expected = sum(v.inverse(torch.sigmoid(bare(v.forward(x))[0])) for v in views) / len(views)
    for config in ({}, {"contiguous_norms": True}, {"memory_format": "contiguous"}):
        net = InferenceNet(copy.deepcopy(bare), inference_plan("cpu", None, config)).eval()
        for view_batch in (1, 2):
            mean, _, members = predict_probabilities(images, [net], views, view_batch, torch.device("cpu"),
                                                     None)
            assert members == len(views)
            torch.testing.assert_close(torch.from_numpy(mean), expected, rtol=1e-5, atol=1e-6)

"""Tests for brats_lightning.plots: slice choice, overlay content and colours, box plots, training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from brats_lightning.data.labels import BRATS2023
from brats_lightning.metrics import EMPTY_HD95
from brats_lightning.plots import (
    REGION_COLOURS,
    boxplot_figure,
    overlay_figure,
    overlay_slice,
    save_overlay,
    training_curves,
    training_curves_figure,
    tumour_slice_index,
)

SHAPE = (40, 44, 30)


def brain_and_tumour() -> tuple[np.ndarray, np.ndarray]:
    """A dark ellipsoid 'brain' with a 2020-coded tumour: ED shell, NCR core, ET ring, centred at z = 12."""
    x, y, z = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    brain = ((x - 20) / 18) ** 2 + ((y - 22) / 20) ** 2 + ((z - 15) / 14) ** 2 < 1
    images = np.stack([brain * (0.3 + 0.1 * c) for c in range(4)]).astype(np.float32)
    r2 = (x - 18) ** 2 + (y - 24) ** 2 + (z - 12) ** 2
    labels = np.zeros(SHAPE, np.uint8)
    labels[r2 < 64] = 2
    labels[r2 < 25] = 4
    labels[r2 < 9] = 1
    return images, labels


def test_tumour_slice_index_is_the_whole_tumour_centre_of_mass() -> None:
    gt = np.zeros((5, 5, 10), np.uint8)
    gt[0, 0, 2] = 2                  # 1 voxel at z = 2
    gt[1:4, 1, 6] = 1                # 3 voxels at z = 6: centre (2 + 3 * 6) / 4 = 5
    pred = np.zeros_like(gt)
    pred[2, 2, 8] = 4
    assert tumour_slice_index(gt, pred) == 5
    assert tumour_slice_index(np.zeros_like(gt), pred) == 8      # ground truth empty -> prediction's
    assert tumour_slice_index(np.zeros_like(gt), np.zeros_like(gt)) == 5  # both empty -> middle (10 // 2)


def test_overlay_slice_takes_t1ce_and_flair_at_the_centre() -> None:
    images, labels = brain_and_tumour()
    data = overlay_slice(images, labels, np.zeros_like(labels))
    assert data.z == 12
    np.testing.assert_array_equal(data.images, images[[1, 3], :, :, 12])
    # regions at the slice: ET = {4}, TC = {1, 4}, WT = {1, 2, 4}
    np.testing.assert_array_equal(data.gt_regions[0], labels[:, :, 12] == 4)
    np.testing.assert_array_equal(data.gt_regions[2], labels[:, :, 12] > 0)
    assert not data.pred_regions.any()
    with pytest.raises(ValueError, match="same grid"):
        overlay_slice(images, labels, labels[:, :, :-1])


def test_overlay_figure_draws_solid_ground_truth_and_dashed_prediction() -> None:
    images, gt = brain_and_tumour()
    pred = np.roll(gt, 2, axis=0)
    pred[pred == 1] = 0  # no NCR predicted: ET still there, TC = ET
    figure = overlay_figure(images, gt, pred, "BraTS20_Training_007")
    assert "BraTS20_Training_007" in figure.texts[0].get_text() and "z=12" in figure.texts[0].get_text()
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["T1ce", "FLAIR"]
    for ax in panels:
        # 3 ground truth regions + 3 predicted regions (all non-empty on this slice) -> 6 contour sets
        contours = ax.collections
        assert len(contours) == 6
        styles = [tuple(c.get_linestyle()[0][1] or ()) for c in contours]
        assert [bool(s) for s in styles] == [False] * 3 + [True] * 3  # solid first, then dashed
        colours = [tuple(np.round(c.get_edgecolor()[0][:3], 3)) for c in contours[:3]]
        assert colours == [tuple(np.round(to_rgb(REGION_COLOURS[r]), 3)) for r in ("WT", "TC", "ET")]


def test_overlay_with_2023_codes_and_empty_prediction(tmp_path: Path) -> None:
    images, gt = brain_and_tumour()
    gt[gt == 4] = 3
    figure = overlay_figure(images, gt, np.zeros_like(gt), "BraTS-GLI-00001-000", convention=BRATS2023)
    panels = [ax for ax in figure.axes if ax.images]
    assert all(len(ax.collections) == 3 for ax in panels)  # ground truth only
    assert "ET 0.000" in figure.texts[0].get_text()


def test_saved_overlay_shows_the_paper_colours(tmp_path: Path) -> None:
    images, gt = brain_and_tumour()
    path = save_overlay(images, gt, gt, "case", tmp_path / "sub" / "overlay.png")
    pixels = matplotlib.image.imread(path)[..., :3]
    for region in ("ET", "TC", "WT"):
        colour = np.asarray(to_rgb(REGION_COLOURS[region]))
        assert (np.abs(pixels - colour).max(axis=-1) < 0.05).sum() > 20, region


def test_boxplot_figure_axes() -> None:
    regions = ("et", "tc", "wt")
    cases = pd.DataFrame({f"{m}_{r}": [0.5, 0.7, 0.9] for m in ("dice", "sens", "spec") for r in regions})
    for r in regions:
        cases[f"hd95_{r}"] = [1.0, 2.0, 3.0]
    figure = boxplot_figure(cases, "demo")
    assert [ax.get_title() for ax in figure.axes] == ["Dice", "HD95 (mm)", "Sensitivity", "Specificity"]
    assert figure.axes[1].get_yscale() == "linear"
    cases.loc[0, "hd95_et"] = EMPTY_HD95
    figure = boxplot_figure(cases.drop(columns=["sens_et", "sens_tc", "sens_wt"]))
    assert [ax.get_title() for ax in figure.axes] == ["Dice", "HD95 (mm), symlog", "Specificity"]
    assert figure.axes[1].get_yscale() == "symlog"


def test_training_curves_from_a_csv_logger_file(tmp_path: Path) -> None:
    # the shape pytorch_lightning's CSVLogger writes: step rows and epoch rows interleaved, NaN elsewhere
    rows = []
    for epoch in range(3):
        for step in range(2):
            loss = 1.0 - 0.1 * epoch - step
            rows.append({"epoch": epoch, "step": 2 * epoch + step, "train/loss_step": loss})
        rows.append({"epoch": epoch, "step": 2 * epoch + 1, "train/loss_epoch": 0.9 - 0.2 * epoch})
        rows.append({"epoch": epoch, "step": 2 * epoch + 1, "val/loss": 0.8 - 0.2 * epoch,
                     "val/dice_et": 0.2 * epoch, "val/dice_wt": 0.3 * epoch})
    csv = tmp_path / "metrics.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    figure = training_curves_figure(csv)
    loss_ax, dice_ax = figure.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == {"train/loss_epoch", "val/loss"}  # the _step twin is left out
    np.testing.assert_allclose(lines["val/loss"].get_ydata(), [0.8, 0.6, 0.4])
    np.testing.assert_allclose(lines["train/loss_epoch"].get_xdata(), [0, 1, 2])
    dice = {line.get_label(): line.get_ydata() for line in dice_ax.get_lines()}
    np.testing.assert_allclose(dice["val/dice_wt"], [0.0, 0.3, 0.6])
    assert training_curves(csv, tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # only step losses: they are averaged per epoch
    pd.DataFrame(rows).drop(columns=["train/loss_epoch"]).to_csv(csv, index=False)
    lines = {line.get_label(): line for line in training_curves_figure(csv).axes[0].get_lines()}
    # mean of the two steps (1 - 0.1 e) and (0 - 0.1 e) of epoch e
    np.testing.assert_allclose(lines["train/loss_step"].get_ydata(), [0.5, 0.4, 0.3])
    pd.DataFrame({"step": [0], "loss": [1.0]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="epoch"):
        training_curves_figure(csv)


def test_training_curves_main_head_loss_best_epoch_lr_and_title(tmp_path: Path) -> None:
    rows = []
    for epoch in range(4):
        rows.append({"step": 2 * epoch, "lr-Adam": 0.01 / (epoch + 1)})  # LearningRateMonitor: no epoch
        rows.append({"epoch": epoch, "step": 2 * epoch + 1, "train/loss_epoch": 5.0 - epoch,
                     "train/loss_main": 1.0 - 0.1 * epoch})
        rows.append({"epoch": epoch, "step": 2 * epoch + 1, "val/loss": [0.9, 0.7, 0.8, 0.75][epoch],
                     "val/dice_et": 0.1 * epoch, "val/dice_tc": 0.2, "val/dice_wt": 0.3, "val/dice_mean": 0.2,
                     "val/channel_dice_mean": 0.25})
    csv = tmp_path / "metrics.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    figure = training_curves_figure(csv, title="demo: pipeline B / unet / fold 2", monitor="val/loss")
    assert figure._suptitle.get_text() == "demo: pipeline B / unet / fold 2"
    loss_ax, sum_ax, dice_ax, lr_ax = figure.axes  # the deep-supervision sum on its own (twin) axis
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    np.testing.assert_allclose(lines["train/loss_main"].get_ydata(), [1.0, 0.9, 0.8, 0.7])
    assert "val/loss" in lines and "train/loss_epoch" not in lines
    np.testing.assert_allclose(sum_ax.get_lines()[0].get_ydata(), [5, 4, 3, 2])
    best = [line for line in dice_ax.get_lines() if line.get_label().startswith("best.ckpt")]
    assert len(best) == 1 and list(best[0].get_xdata()) == [1, 1]  # lowest val/loss: epoch 1
    assert [line.get_label() for line in dice_ax.get_lines()][:4] == [
        "val/dice_et", "val/dice_tc", "val/dice_wt", "val/dice_mean"]  # ET, TC, WT everywhere
    lr = lr_ax.get_lines()[0]
    np.testing.assert_allclose(lr.get_xdata(), [0, 1, 2, 3])
    np.testing.assert_allclose(lr.get_ydata(), [0.01, 0.005, 0.01 / 3, 0.0025])
    assert lr_ax.get_yscale() == "log"

"""Figures: segmentation overlays (paper Fig. 3 style), per-case metric box plots, training curves.

Everything draws on :class:`matplotlib.figure.Figure` objects with an explicit Agg canvas, never through
``pyplot``: no global backend state, no display needed, safe inside training callbacks and worker processes.

Colours follow the paper's Fig. 3: enhancing tumour (ET) red, necrosis / non-enhancing core (NCR/NET) green,
edema (ED) yellow. Overlays outline the nested regions (ET, TC, WT), so the red line is the ET border, the
green line the tumour-core border (NCR/NET plus ET) and the yellow line the whole-tumour border (its outer
part is edema); ground truth is drawn solid, the prediction dashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from brats_lightning.data.labels import BRATS2020, REGIONS, LabelConvention, labels_to_regions

REGION_COLOURS: dict[str, str] = {"ET": "red", "TC": "limegreen", "WT": "yellow"}
"""Outline colour of each region: ET red, TC green (NCR/NET), WT yellow (ED), as in the paper's Fig. 3."""
REGION_LEGEND: dict[str, str] = {"ET": "ET border", "TC": "TC border", "WT": "WT border"}
"""Legend entries: the regions the network predicts (one vocabulary; the colours follow the labels above)."""
IMAGE_PANELS: tuple[tuple[int, str], ...] = ((1, "T1ce"), (3, "FLAIR"))
"""(channel, title) of the images shown side by side; channels in the order t1, t1ce, t2, flair."""


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", facecolor=figure.get_facecolor())
    return path


# ---------------------------------------------------------------- overlays

@dataclass
class OverlaySlice:
    """The 2D data one overlay needs: one axial slice of two images and of both label maps.

    Attributes:
        z: the axial slice index in the volume.
        images: float (2, X, Y), the channels of :data:`IMAGE_PANELS`.
        gt_regions: bool (3, X, Y) ground truth ET, TC, WT at that slice (all False when unknown).
        pred_regions: bool (3, X, Y) predicted regions at that slice.
    """

    z: int
    images: np.ndarray
    gt_regions: np.ndarray
    pred_regions: np.ndarray


def tumour_slice_index(gt_labels: np.ndarray, pred_labels: np.ndarray) -> int:
    """Axial index through the tumour centre: the ground truth whole tumour's centre of mass along z.

    Falls back to the prediction's whole tumour when the ground truth is empty, and to the middle slice
    when both are empty.
    """
    for labels in (gt_labels, pred_labels):
        per_slice = np.count_nonzero(np.asarray(labels).reshape(-1, labels.shape[-1]), axis=0)
        if per_slice.any():
            return int(round(float(np.average(np.arange(per_slice.size), weights=per_slice))))
    return gt_labels.shape[-1] // 2


def overlay_slice(images: np.ndarray, gt_labels: np.ndarray, pred_labels: np.ndarray,
                  convention: LabelConvention = BRATS2020, z: int | None = None) -> OverlaySlice:
    """Extract the axial slice an overlay shows (see :func:`tumour_slice_index`).

    Args:
        images: (4, X, Y, Z) in the channel order t1, t1ce, t2, flair.
        gt_labels: (X, Y, Z) ground truth label map.
        pred_labels: (X, Y, Z) predicted label map.
        convention: label codes of both maps.
        z: the slice to show; default the tumour centre.
    """
    images, gt_labels, pred_labels = np.asarray(images), np.asarray(gt_labels), np.asarray(pred_labels)
    if images.ndim != 4 or images.shape[1:] != gt_labels.shape or gt_labels.shape != pred_labels.shape:
        raise ValueError(f"expected images (4, X, Y, Z) and two (X, Y, Z) label maps on the same grid, found "
                         f"{images.shape}, {gt_labels.shape} and {pred_labels.shape}")
    z = tumour_slice_index(gt_labels, pred_labels) if z is None else int(z)
    channels = [channel for channel, _ in IMAGE_PANELS]
    return OverlaySlice(
        z=z,
        images=np.asarray(images[channels, :, :, z], dtype=np.float32),
        gt_regions=labels_to_regions(gt_labels[:, :, z], convention),
        pred_regions=labels_to_regions(pred_labels[:, :, z], convention),
    )


def _display_box(images: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """In-plane box of the non-zero image voxels (the brain) plus a margin, so the tumour is not tiny."""
    nonzero = np.any(images != 0, axis=0)
    if not nonzero.any():
        return slice(None), slice(None)
    xs, ys = np.flatnonzero(nonzero.any(axis=1)), np.flatnonzero(nonzero.any(axis=0))
    return (slice(max(xs[0] - margin, 0), xs[-1] + margin + 1),
            slice(max(ys[0] - margin, 0), ys[-1] + margin + 1))


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range: 1st-99th percentile of the non-zero voxels (the whole slice if none)."""
    values = image[image != 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [1, 99])
    return float(min(low, 0.0)), float(high if high > low else low + 1.0)


def draw_overlay(data: OverlaySlice, case_id: str, dice: Sequence[float] | None = None) -> Figure:
    """Draw an :class:`OverlaySlice`: the images side by side, ground truth solid, prediction dashed.

    Args:
        data: the slice (see :func:`overlay_slice`).
        case_id: shown in the title.
        dice: optional whole-volume Dice (ET, TC, WT) shown in the title.
    """
    box = _display_box(data.images)
    panels = len(IMAGE_PANELS)
    figure = _new_figure(4.2 * panels, 5.1)
    figure.patch.set_facecolor("black")
    title = f"{case_id}\naxial slice z={data.z}"
    if dice is not None:
        title += "   Dice " + "  ".join(f"{r} {d:.3f}" for r, d in zip(REGIONS, dice, strict=True))
    figure.suptitle(title, color="white", fontsize=10.5)
    for index, (_, name) in enumerate(IMAGE_PANELS):
        ax = figure.add_subplot(1, panels, index + 1)
        image = data.images[index][box]
        low, high = _window(image)
        # nibabel arrays are (x, y): transpose so x runs left-right and y (anterior) points up
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=low, vmax=high, interpolation="nearest")
        for masks, style in ((data.gt_regions, "solid"), (data.pred_regions, "dashed")):
            for region_index in reversed(range(len(REGIONS))):  # WT first, so inner borders stay on top
                region = REGIONS[region_index]
                mask = masks[region_index][box]
                if mask.any():
                    ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=REGION_COLOURS[region],
                               linestyles=style, linewidths=1.4)
        ax.set_title(name, color="white", fontsize=10)
        ax.set_axis_off()
    handles = [Line2D([], [], color=REGION_COLOURS[r], lw=2, label=REGION_LEGEND[r]) for r in REGIONS]
    handles += [Line2D([], [], color="white", lw=1.4, ls="solid", label="ground truth"),
                Line2D([], [], color="white", lw=1.4, ls="dashed", label="prediction")]
    legend = figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    for text in legend.get_texts():
        text.set_color("white")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.08, wspace=0.03)
    return figure


def overlay_figure(images: np.ndarray, gt_labels: np.ndarray, pred_labels: np.ndarray, case_id: str,
                   convention: LabelConvention = BRATS2020, z: int | None = None) -> Figure:
    """Overlay of one case (paper Fig. 3): t1ce and flair at the tumour centre, contours of both label maps.

    Args:
        images: (4, X, Y, Z), channels t1, t1ce, t2, flair.
        gt_labels: (X, Y, Z) ground truth label map (all zero when unknown).
        pred_labels: (X, Y, Z) predicted label map.
        case_id: shown in the title, with the whole-volume Dice of each region.
        convention: label codes of both maps.
        z: axial slice; default the ground truth whole tumour's centre (the prediction's if that is empty).
    """
    from brats_lightning.metrics import dice

    data = overlay_slice(images, gt_labels, pred_labels, convention, z)
    gt, pred = labels_to_regions(gt_labels, convention), labels_to_regions(pred_labels, convention)
    return draw_overlay(data, case_id, [dice(pred[i], gt[i]) for i in range(len(REGIONS))])


def save_overlay(images: np.ndarray, gt_labels: np.ndarray, pred_labels: np.ndarray, case_id: str,
                 path: str | Path, convention: LabelConvention = BRATS2020, z: int | None = None) -> Path:
    """:func:`overlay_figure` written to ``path`` as PNG."""
    return save_figure(overlay_figure(images, gt_labels, pred_labels, case_id, convention, z), path)


# ---------------------------------------------------------------- per-case metrics

BOXPLOT_PANELS: tuple[tuple[str, str], ...] = (("lw_dice", "Lesion-wise Dice"),
                                               ("lw_hd95", "Lesion-wise HD95 (mm)"),
                                               ("dice", "Dice"), ("hd95", "HD95 (mm)"),
                                               ("sens", "Sensitivity"), ("spec", "Specificity"))
"""Box plot panels; those whose columns the table has are drawn (lesion-wise ones with BraTS 2023 rules)."""


def boxplot_figure(cases: pd.DataFrame, title: str = "") -> Figure:
    """Box plots of per-case metrics, one panel per metric, one box per region (ET, TC, WT).

    The HD95 panel switches to a symlog axis when a value exceeds 50 mm (the 373.13 mm empty-mask penalty
    would flatten the other boxes).

    Args:
        cases: evaluate's per-case table (columns ``dice_et``, ..., ``spec_wt``); missing metrics are skipped.
        title: figure title (e.g. the data set / method label).
    """
    panels = [(key, name) for key, name in BOXPLOT_PANELS if f"{key}_et" in cases.columns]
    figure = _new_figure(3.2 * len(panels), 3.6)
    for index, (key, name) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), index + 1)
        columns = [f"{key}_{region.lower()}" for region in REGIONS]
        values = [cases[c].dropna().to_numpy(dtype=float) for c in columns]
        boxes = ax.boxplot(values, patch_artist=True, widths=0.6, medianprops={"color": "black"})
        ax.set_xticks(range(1, len(REGIONS) + 1), list(REGIONS))
        for patch, region in zip(boxes["boxes"], REGIONS, strict=True):
            patch.set_facecolor({"ET": "tomato", "TC": "mediumseagreen", "WT": "gold"}[region])
        if key.endswith("hd95"):
            ax.set_ylim(bottom=0)
            if max((v.max() for v in values if v.size), default=0.0) > 50:
                # empty-mask penalties (373.13 mm) would flatten every other box on a linear axis
                ax.set_yscale("symlog", linthresh=10.0)
                name += ", symlog"
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{title}  (n = {len(cases)} cases)" if title else f"n = {len(cases)} cases", fontsize=11)
    figure.tight_layout()
    return figure


def metric_boxplots(cases: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """:func:`boxplot_figure` written to ``path`` as PNG."""
    return save_figure(boxplot_figure(cases, title), path)


# ---------------------------------------------------------------- training curves

def _epoch_curve(frame: pd.DataFrame, column: str) -> pd.Series:
    """Per-epoch values of ``column`` (step rows averaged per epoch; epochs without a value dropped).

    Rows without an epoch (LearningRateMonitor's, logged as an epoch starts) count for the next row's epoch.
    """
    return frame.assign(epoch=frame["epoch"].bfill()).groupby("epoch")[column].mean().dropna()


def best_epoch(metrics_csv: str | Path, monitor: str, mode: str = "min") -> int | None:
    """The epoch with the best ``monitor`` value in ``metrics_csv`` (first one on ties), None without it."""
    frame = pd.read_csv(metrics_csv)
    if monitor not in frame.columns or "epoch" not in frame.columns:
        return None
    series = _epoch_curve(frame, monitor)
    if series.empty:
        return None
    return int(series.idxmin() if mode == "min" else series.idxmax())


def training_curves_figure(metrics_csv: str | Path, title: str = "", monitor: str | None = None,
                           mode: str = "min") -> Figure:
    """Plot a CSVLogger ``metrics.csv`` per epoch: losses, validation Dice, learning rate.

    * losses: the main head's training loss (``train/loss_main``, else ``train/loss``) beside ``val/loss``
      (the main head's too); the optimized deep-supervision sum (``train/loss`` when ``train/loss_main``
      exists: 5 heads, paper section 2.2) on its own right-hand axis;
    * validation Dice of the label map, ET, TC, WT and their mean (``val/dice_*``), and the per-channel mean
      (``val/channel_dice_mean``) dashed;
    * the learning rate (``lr-*`` columns of Lightning's LearningRateMonitor), log scale.

    ``*_epoch`` columns are used where they exist (``*_step`` rows are averaged per epoch otherwise). The
    epoch with the best ``monitor`` value (best.ckpt's) is marked in every panel.

    Args:
        metrics_csv: the CSV logger's file (needs an ``epoch`` column).
        title: figure title (train.py: the run's name, pipeline, model and fold).
        monitor: the metric best.ckpt is chosen by (e.g. ``val/loss``); None: no marker.
        mode: ``min`` or ``max`` for ``monitor``.
    """
    frame = pd.read_csv(metrics_csv)
    if "epoch" not in frame.columns:
        raise ValueError(f"{metrics_csv}: no 'epoch' column (found {list(frame.columns)}); expected the "
                         "metrics.csv that pytorch_lightning's CSVLogger writes")
    columns = set(frame.columns)

    def pick(name: str) -> str | None:
        return next((c for c in (f"{name}_epoch", name, f"{name}_step") if c in columns), None)

    main_loss, total_loss = pick("train/loss_main"), pick("train/loss")
    if main_loss is None:
        main_loss, total_loss = total_loss, None
    losses = [c for c in (main_loss, pick("val/loss")) if c]
    dice_names = (*(f"val/dice_{r.lower()}" for r in REGIONS), "val/dice_mean", "val/channel_dice_mean")
    dices = [c for c in dice_names if c in columns]
    rates = sorted(c for c in frame.columns if c.startswith("lr-"))
    if not losses and not dices:
        raise ValueError(f"{metrics_csv}: no train/val loss or val Dice column among {list(frame.columns)}")
    panels = [(cols, label) for cols, label in ((losses, "loss (main head)"), (dices, "validation Dice"),
                                                (rates, "learning rate")) if cols]
    best = best_epoch(metrics_csv, monitor, mode) if monitor else None
    figure = _new_figure(4.6 * len(panels), 3.9)
    for index, (cols, label) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), index + 1)
        for column in cols:
            series = _epoch_curve(frame, column)
            ax.plot(series.index, series.to_numpy(), marker="o" if len(series) < 30 else None, ms=3,
                    label=column, ls="--" if "channel_dice" in column else "-")
        if label.startswith("loss") and total_loss is not None:
            twin = ax.twinx()
            series = _epoch_curve(frame, total_loss)
            twin.plot(series.index, series.to_numpy(), color="grey", ls=":",
                      label=f"{total_loss} (all heads)")
            twin.set_ylabel("deep-supervision sum", color="grey", fontsize=8)
            twin.legend(fontsize=7, loc="lower left")
        if best is not None:
            ax.axvline(best, color="black", ls=":", lw=1, label=f"best.ckpt (epoch {best}, {monitor})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if label.endswith("Dice"):
            ax.set_ylim(0, 1)
        if label == "learning rate" and (frame[cols] > 0).any().any():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def training_curves(metrics_csv: str | Path, path: str | Path, title: str = "", monitor: str | None = None,
                    mode: str = "min") -> Path:
    """:func:`training_curves_figure` of ``metrics_csv`` written to ``path`` as PNG."""
    return save_figure(training_curves_figure(metrics_csv, title, monitor, mode), path)

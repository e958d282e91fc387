"""The paper's 3D U-Nets: ``EquiUnet``, ``Unet`` and the attention variant ``AttEquiUnet``.

Paper section 2.1 (Fig. 2) / docs/method.md "Network". With width w:

- encoder stages w, 2w, 4w, 8w (two blocks each, MaxPool3d(2) between stages);
- "bottom": two 8w -> 8w blocks with dilation 2 at the 4th stage's resolution;
- "bottom_2": one block [stage4, bottom] (16w) -> 4w;
- decoder (trilinear x2, align_corners=True, concat [skip, upsampled]): 8w -> 4w -> 2w, 4w -> 2w -> w,
  2w -> w -> w; head 1x1x1 conv w -> 3 (with bias), returning logits;
- deep supervision (training only): 1x1x1 conv -> 3 + trilinear upsampling to full size on bottom,
  bottom_2, the 1/4-resolution decoder stage and the 1/2-resolution decoder stage.

``Unet`` halves the first conv of each encoder stage and ends the last decoder stage at w/2.
``AttEquiUnet`` adds a CBAM after each encoder stage, after bottom and after bottom_2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brats_lightning.models.attention import cbam_factory
from brats_lightning.models.blocks import (
    AttentionFactory,
    NormFactory,
    Stage,
    conv1x1,
    group_norm,
    init_weights,
)

NetOutput = torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]


class _UNet3D(nn.Module):
    """Shared body of the three networks (see the module docstring).

    Args:
        in_channels: input modalities (4).
        out_channels: output regions (3: ET, TC, WT).
        width: w, the first stage's width (48 in the paper).
        deep_supervision: build the 4 deep heads and return their logits in training mode.
        norm: norm factory ``num_channels -> nn.Module``.
        encoder_entry_ratio: width of each encoder stage's first conv relative to the stage width
            (1 for EquiUnet, 0.5 for Unet).
        last_width: output width of the last decoder stage (w for EquiUnet, w // 2 for Unet).
        attention: optional factory applied after each encoder stage, bottom and bottom_2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int,
        deep_supervision: bool,
        norm: NormFactory,
        encoder_entry_ratio: float,
        last_width: int,
        attention: AttentionFactory | None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if width < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"{name}: got in_channels={in_channels}, out_channels={out_channels}, width={width}; "
                "all must be >= 1 (check conf/model/)"
            )
        w = width
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.width = width
        self.deep_supervision = deep_supervision

        widths = [w, 2 * w, 4 * w, 8 * w]
        entry = [max(1, int(c * encoder_entry_ratio)) for c in widths]
        self.encoder1 = Stage((in_channels, entry[0], widths[0]), norm, attention=attention)
        self.encoder2 = Stage((widths[0], entry[1], widths[1]), norm, attention=attention)
        self.encoder3 = Stage((widths[1], entry[2], widths[2]), norm, attention=attention)
        self.encoder4 = Stage((widths[2], entry[3], widths[3]), norm, attention=attention)
        self.bottom = Stage((8 * w, 8 * w, 8 * w), norm, dilation=2, attention=attention)
        self.bottom_2 = Stage((16 * w, 4 * w), norm, attention=attention)
        self.decoder3 = Stage((8 * w, 4 * w, 2 * w), norm)
        self.decoder2 = Stage((4 * w, 2 * w, w), norm)
        self.decoder1 = Stage((2 * w, w, last_width), norm)
        self.pool = nn.MaxPool3d(2)
        self.head = conv1x1(last_width, out_channels)
        if deep_supervision:
            self.deep_bottom = conv1x1(8 * w, out_channels)
            self.deep_bottom_2 = conv1x1(4 * w, out_channels)
            self.deep3 = conv1x1(2 * w, out_channels)
            self.deep2 = conv1x1(w, out_channels)
        init_weights(self)

    def _check_shape(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name}: got input of shape {tuple(x.shape)}; expected (B, {self.in_channels}, X, Y, Z)"
            )
        bad = [s for s in x.shape[2:] if s % 8]
        if bad:
            raise ValueError(
                f"{name}: got input of shape {tuple(x.shape)}; every spatial side must be a multiple of 8 "
                "(the network pools 3 times). Zero-pad the volume first, e.g. with "
                "brats_lightning.data.preprocess.pad_to_multiple(array, 8), or crop to a multiple of 8."
            )

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)

    def forward(self, x: torch.Tensor, deep_outputs: bool | None = None) -> NetOutput:
        """Logits (B, 3, X, Y, Z); in training mode with deep supervision ``(logits, [4 deep logits])``.

        The deep logits are, in order, from bottom, bottom_2, the 1/4- and the 1/2-resolution decoder
        stages, each upsampled (trilinear, align_corners=True) to the input's spatial size.

        Args:
            x: (B, in_channels, X, Y, Z), every side a multiple of 8.
            deep_outputs: None: deep logits in training mode only; True: in either mode (a validation loss
                with the deep heads, as the authors' code computed it); False: never.
        """
        if deep_outputs is None:
            deep_outputs = self.training and self.deep_supervision
        elif deep_outputs and not self.deep_supervision:
            raise ValueError(f"{type(self).__name__}: deep_outputs=True needs deep_supervision=True "
                             "(model.deep_supervision)")
        self._check_shape(x)
        down1 = self.encoder1(x)
        down2 = self.encoder2(self.pool(down1))
        down3 = self.encoder3(self.pool(down2))
        down4 = self.encoder4(self.pool(down3))
        bottom = self.bottom(down4)
        bottom_2 = self.bottom_2(torch.cat([down4, bottom], dim=1))
        up3 = self.decoder3(torch.cat([down3, self._up(bottom_2)], dim=1))
        up2 = self.decoder2(torch.cat([down2, self._up(up3)], dim=1))
        up1 = self.decoder1(torch.cat([down1, self._up(up2)], dim=1))
        logits = self.head(up1)
        if not deep_outputs:
            return logits
        size = x.shape[2:]
        deeps = [
            F.interpolate(head(feat), size=size, mode="trilinear", align_corners=True)
            for head, feat in (
                (self.deep_bottom, bottom),
                (self.deep_bottom_2, bottom_2),
                (self.deep3, up3),
                (self.deep2, up2),
            )
        ]
        return logits, deeps


class EquiUnet(_UNet3D):
    """The paper's main network: every conv of a resolution level has the level's width.

    Args:
        in_channels: input modalities (4: t1, t1ce, t2, flair).
        out_channels: output regions (3: ET, TC, WT).
        width: first-stage width w (48 in the paper: 23.15 M parameters with GroupNorm and deep supervision).
        deep_supervision: add the 4 deep-supervision heads (outputs in training mode only).
        norm: norm factory, e.g. :func:`~brats_lightning.models.blocks.group_norm` (pipeline A) or
            :func:`~brats_lightning.models.blocks.instance_norm` (pipeline B).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        width: int = 48,
        deep_supervision: bool = True,
        norm: NormFactory = group_norm,
    ) -> None:
        super().__init__(
            in_channels, out_channels, width, deep_supervision, norm,
            encoder_entry_ratio=1.0, last_width=width, attention=None,
        )


class Unet(_UNet3D):
    """EquiUnet with each encoder stage's first conv at half the stage width and a w/2 last decoder stage.

    Args:
        in_channels: input modalities (4).
        out_channels: output regions (3).
        width: first-stage width w; must be even.
        deep_supervision: add the 4 deep-supervision heads (outputs in training mode only).
        norm: norm factory.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        width: int = 48,
        deep_supervision: bool = True,
        norm: NormFactory = group_norm,
    ) -> None:
        if width % 2:
            raise ValueError(f"Unet: got width={width}; expected an even width (its last stage has width/2)")
        super().__init__(
            in_channels, out_channels, width, deep_supervision, norm,
            encoder_entry_ratio=0.5, last_width=width // 2, attention=None,
        )


class AttEquiUnet(_UNet3D):
    """EquiUnet with a CBAM after each encoder stage, after bottom and after bottom_2 (attention U-Net).

    Args:
        in_channels: input modalities (4).
        out_channels: output regions (3).
        width: first-stage width w.
        deep_supervision: add the 4 deep-supervision heads (outputs in training mode only).
        norm: norm factory (also used by the spatial gate when ``gate_norm`` is True).
        reduction: CBAM channel-MLP reduction ratio (16).
        gate_norm: put norm + ReLU before the spatial gate's sigmoid as the reference code did; this
            squashes the spatial gate to [0.5, 1). Off by default.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        width: int = 48,
        deep_supervision: bool = True,
        norm: NormFactory = group_norm,
        reduction: int = 16,
        gate_norm: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, width, deep_supervision, norm,
            encoder_entry_ratio=1.0, last_width=width,
            attention=cbam_factory(norm, reduction=reduction, gate_norm=gate_norm),
        )

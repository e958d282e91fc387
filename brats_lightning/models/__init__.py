"""3D U-Nets of the paper (docs/method.md "Network"): ``EquiUnet``, ``Unet`` and ``AttEquiUnet``."""

from __future__ import annotations

from brats_lightning.models.attention import CBAM
from brats_lightning.models.blocks import group_norm, instance_norm
from brats_lightning.models.unet import AttEquiUnet, EquiUnet, Unet

__all__ = ["CBAM", "AttEquiUnet", "EquiUnet", "Unet", "group_norm", "instance_norm"]

"""The LightningModule: deep-supervised Dice training, whole-brain validation, optimizers and schedules.

Paper sections 2.2-2.5 / docs/method.md "Loss", "Augmentation", "Training". One module serves both pipelines;
everything that differs between them comes from the ``pipeline`` config (conf/pipeline/A.yaml, B.yaml):
the Dice loss denominator (A squared, B plain), the batch augmentation probabilities, the optimizer
(A Ranger, B Adam) and the schedule. The network is built from the ``model`` config with
``hydra.utils.instantiate`` and kept as ``self.net``, so checkpoint keys are ``net.<param>``
(docs/contracts.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import hydra.utils
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from brats_lightning.data.augment import BatchAugment
from brats_lightning.data.labels import (
    REGIONS,
    convention_for_regions,
    labels_to_regions_torch,
    regions_to_labels_torch,
)
from brats_lightning.data.preprocess import Box
from brats_lightning.losses import DeepSupervisionLoss, DiceLoss
from brats_lightning.memory import build_network
from brats_lightning.metrics import case_metrics, region_dice
from brats_lightning.optim import build_optimizer, build_scheduler
from brats_lightning.speed import (
    CompiledNet,
    SpeedConfig,
    SpeedPlan,
    convert_input,
    convert_module,
    resolve_speed,
)

log = logging.getLogger(__name__)


def _plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """A resolved plain ``dict`` copy of a config node (so checkpoints hold no OmegaConf objects)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return {k: _plain(v) if isinstance(v, (Mapping, DictConfig)) else v for k, v in cfg.items()}


class BratsModule(pl.LightningModule):
    """BraTS region segmentation (ET, TC, WT) with a deeply supervised 3D U-Net.

    Training batches ``{"image": (B, 4, X, Y, Z), "target": (B, 3, X, Y, Z) bool, "case_id": [...]}`` are
    augmented on the device (:class:`~brats_lightning.data.augment.BatchAugment`, training only), and the loss
    is ``DeepSupervisionLoss(DiceLoss(squared))`` (main output + 4 deep heads). Validation batches hold the
    whole brain box padded to a multiple of 8 plus the unpadding ``box`` (docs/contracts.md); logits are
    unpadded, thresholded at sigmoid > 0.5, turned into the label map inference writes and back into its
    (nested) regions, and scored per case with :func:`~brats_lightning.metrics.region_dice`.

    Logged: ``train/loss`` (step and epoch; with the deep-supervision heads), ``train/loss_main`` (epoch; the
    main head alone), ``val/loss``, ``val/dice_et``, ``val/dice_tc``, ``val/dice_wt``, ``val/dice_mean`` (the
    label map's Dice: what the suite writes and scores; means over validation cases),
    ``val/channel_dice_{et,tc,wt,mean}`` (each thresholded output channel on its own, before the label map)
    and, when ``validation.hd95`` is true, ``val/hd95_*`` (label map).

    Args:
        model_config: Hydra config of the network (``_target_`` + kwargs), e.g. conf/model/equiunet.yaml.
        pipeline: the pipeline config: ``loss.squared``, ``augment`` (BatchAugment kwargs, or null for none),
            ``optimizer`` (:func:`~brats_lightning.optim.build_optimizer`), ``scheduler``
            (:func:`~brats_lightning.optim.build_scheduler`).
        validation: ``{"hd95": bool}`` (HD95 per validation case; slower).
        speed: the ``speed`` config (conf/speed/default.yaml: memory format, torch.compile), resolved for the
            trainer's device and precision in :meth:`configure_model` (:mod:`brats_lightning.speed`); None:
            everything ``auto``. Without a trainer (or before ``configure_model``) the plain path runs.
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        pipeline: Mapping[str, Any],
        validation: Mapping[str, Any] | None = None,
        speed: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model_config, pipeline, validation = _plain(model_config), _plain(pipeline), _plain(validation)
        speed = _plain(speed)
        self.speed_config = SpeedConfig.from_mapping(speed)
        self.save_hyperparameters(
            {"model_config": model_config, "pipeline": pipeline, "validation": validation, "speed": speed})
        self.net = build_network(model_config)  # model.checkpointing: brats_lightning.memory
        loss = pipeline["loss"]  # deep_reduction / val_deep_supervision: docs/fidelity.md (authors' code)
        self.loss = DeepSupervisionLoss(DiceLoss(squared=bool(loss["squared"])),
                                        reduction=loss.get("deep_reduction", "sum"))
        self.val_deep_supervision = bool(loss.get("val_deep_supervision", False))
        if self.val_deep_supervision and not getattr(self.net, "deep_supervision", False):
            raise ValueError("pipeline.loss.val_deep_supervision=true needs a network with deep-supervision "
                             "heads: set model.deep_supervision=true or val_deep_supervision=false")
        augment = pipeline.get("augment")
        if augment and "_target_" in augment:
            self.augment = hydra.utils.instantiate(augment)
        else:
            self.augment = BatchAugment(**augment) if augment else None
        self.hd95 = bool(validation.get("hd95", False))
        self.speed_plan: SpeedPlan | None = None
        self._compiled: CompiledNet | None = None  # a plain object, not a submodule: keys stay net.*

    @classmethod
    def from_config(cls, cfg: DictConfig) -> BratsModule:
        """Build from the full training config (``cfg.model``, ``cfg.pipeline``, ``cfg.validation``)."""
        return cls(cfg.model, cfg.pipeline, cfg.get("validation"), cfg.get("speed"))

    def configure_model(self) -> None:
        """Apply the speed plan for the trainer's device and precision (before optimizers exist)."""
        trainer = self._trainer
        if trainer is not None:
            self.apply_speed(trainer.strategy.root_device.type, str(trainer.precision))

    def apply_speed(self, device_type: str, precision: str) -> SpeedPlan:
        """Resolve ``speed`` for ``device_type`` / ``precision`` and apply it: the network's memory format
        and, when ``compile`` is on, a compiled view of it for training steps (:mod:`brats_lightning.speed`).
        Idempotent for the same device and precision; logs the plan once.
        """
        plan = self.speed_plan
        if plan is not None and (plan.device_type, plan.precision) == (device_type, precision):
            return plan
        plan = resolve_speed(self.speed_config, device_type, precision)
        convert_module(self.net, plan)
        if plan.compile:
            existing = self._compiled
            if existing is None or existing.get(self.net) is None or existing.mode != plan.compile_mode:
                self._compiled = CompiledNet(self.net, plan.compile_mode, plan.compile_dynamic)
        else:
            self._compiled = None
        self.speed_plan = plan
        log.info("speed: %s", plan.describe())
        return plan

    def run_net(self, image: torch.Tensor, compiled: bool = False, deep_outputs: bool | None = None) -> Any:
        """The network on ``image`` in the speed plan's memory format; ``compiled`` uses the compiled view
        when there is one (training steps: fixed crop shapes), else the eager network; ``deep_outputs``
        (when given) is passed to the network (True: the deep logits in eval mode too)."""
        image = convert_input(image, self.speed_plan)
        fn = self._compiled.get(self.net) if compiled and self._compiled is not None else None
        net = self.net if fn is None else fn
        return net(image) if deep_outputs is None else net(image, deep_outputs=deep_outputs)

    def forward(self, image: torch.Tensor) -> Any:
        """The network's output: logits, or ``(logits, [deep logits])`` in training mode."""
        return self.run_net(image)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Per-sample augmentation on the device, training batches only (docs/method.md "Augmentation")."""
        if self.augment is not None and self.trainer.training:
            image, target = self.augment(batch["image"], batch["target"].float())
            batch = {**batch, "image": image, "target": target}
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Deep-supervision Dice loss on one batch of crops.

        Returns:
            ``{"loss", "case_losses": (B,) detached main-output Dice loss per case, "case_id"}``; the per-case
            losses serve patient filtering (docs/method.md "Training").
        """
        image, target = batch["image"], batch["target"]
        output = self.run_net(image, compiled=True)
        loss = self.loss(output, target)
        logits = output[0] if isinstance(output, (tuple, list)) else output
        with torch.no_grad():
            case_losses = self.loss.base.per_sample(logits.detach(), target).mean(dim=1)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=image.shape[0])
        # the main head alone: comparable with val/loss (train/loss adds the deep-supervision heads)
        self.log("train/loss_main", case_losses.mean(), on_step=False, on_epoch=True,
                 batch_size=image.shape[0])
        return {"loss": loss, "case_losses": case_losses, "case_id": batch.get("case_id")}

    def score_batch(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Whole-brain prediction of a validation batch, unpadded and scored per case (nothing logged).

        Shared by :meth:`validation_step` and callbacks that score other weights with the same rules
        (fast SWA's averaged weights, :class:`~brats_lightning.callbacks.fast_swa.FastSWA`).

        Returns:
            ``(metrics, pred_regions)``: ``metrics`` maps ``loss`` (mean Dice loss over the batch's cases),
            ``dice_mean``, ``dice_et``, ``dice_tc``, ``dice_wt`` (the label map's nested regions, means over
            the batch's cases, BraTS empty rules), ``channel_dice_*`` (the thresholded channels as they are)
            and, when ``validation.hd95`` is on, ``hd95_et``... to 0-d tensors; ``pred_regions`` is bool
            (B, 3, X, Y, Z) unpadded, the label map's regions.
        """
        image, target, boxes = batch["image"], batch["target"], batch["box"]
        logits = self.run_net(image, deep_outputs=True if self.val_deep_supervision else None)
        deeps = logits[1] if self.val_deep_supervision else []  # the loss with the deep heads (authors')
        if isinstance(logits, (tuple, list)):  # a network left in training mode by a callback
            logits = logits[0]
        conv = convention_for_regions(logits.shape[1])  # ET, TC, WT and, for BraTS 2024, RC
        losses, preds, channel_preds, extra = [], [], [], []
        for i, box_info in enumerate(boxes):
            box = box_info if isinstance(box_info, Box) else Box.from_dict(box_info)
            crop = (slice(None), slice(None), *box.slices)
            case_logits = logits[i : i + 1][crop]
            case_target = target[i : i + 1]
            case_deeps = [deep[i : i + 1][crop] for deep in deeps]
            losses.append(self.loss((case_logits, case_deeps) if case_deeps else case_logits, case_target))
            channel_preds.append(torch.sigmoid(case_logits.float()) > 0.5)
            # what inference writes: the label map (ET first, then TC, then WT) and its nested regions
            preds.append(labels_to_regions_torch(regions_to_labels_torch(channel_preds[-1], conv), conv))
            if self.hd95:  # the tumour regions (case_metrics scores ET, TC, WT)
                spacing = tuple(batch["spacing"][i]) if "spacing" in batch else (1.0, 1.0, 1.0)
                tumour = slice(0, len(REGIONS))
                extra.append(case_metrics(preds[-1][0, tumour].cpu().numpy(),
                                          case_target[0, tumour].cpu().numpy(), spacing=spacing, hd95=True))
        pred = torch.cat(preds)
        dice = region_dice(pred, target.bool()).float()  # (B, 3), BraTS empty rules
        channel = region_dice(torch.cat(channel_preds), target.bool()).float()
        metrics = {"loss": torch.stack(losses).mean(), "dice_mean": dice.mean(),
                   "channel_dice_mean": channel.mean()}
        for c, region in enumerate(conv.regions):
            metrics[f"dice_{region.lower()}"] = dice[:, c].mean()
            metrics[f"channel_dice_{region.lower()}"] = channel[:, c].mean()
        if extra:
            for region in REGIONS:
                key = f"hd95_{region.lower()}"
                metrics[key] = torch.tensor(sum(m[key] for m in extra) / len(extra))
        return metrics, pred

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Whole-brain prediction, unpadded, scored per case (:meth:`score_batch`); logs ``val/<metric>``.

        Returns:
            ``{"loss": mean Dice loss of the batch, "pred_regions": bool (B, 3, X, Y, Z) unpadded,
            "case_id": [...]}`` for callbacks (docs/contracts.md).
        """
        metrics, pred = self.score_batch(batch)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, on_step=False, on_epoch=True,
                      batch_size=batch["image"].shape[0], sync_dist=True)
        return {"loss": metrics["loss"], "pred_regions": pred, "case_id": list(batch["case_id"])}

    def configure_optimizers(self) -> dict[str, Any]:
        """Optimizer and per-epoch schedule from ``pipeline.optimizer`` / ``pipeline.scheduler``."""
        pipeline = self.hparams["pipeline"]
        optimizer = build_optimizer(self.net.parameters(), pipeline["optimizer"])
        scheduler = build_scheduler(optimizer, pipeline["scheduler"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

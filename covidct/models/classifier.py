"""LightningModule: uint8 windowed slices -> backbone -> 3 class logits, trained with focal loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassF1Score,
)

from covidct.contracts import CLASS_NAMES
from covidct.data.labels import INFECTED, INFECTION_CLASSES, UNKNOWN
from covidct.errors import ConfigError
from covidct.models.backbones import build_backbone
from covidct.models.losses import FocalLoss

if TYPE_CHECKING:
    from covidct.patients.decisions import ValidationVotes
    from covidct.training.callbacks.best_epoch import BestEpoch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputAdapter(nn.Module):
    """uint8 (B, C, H, W) window channels -> float (B, 3, H, W) normalised with ImageNet statistics.

    One channel is repeated to three; three are used as they are; any other count goes through a
    learnable 1x1 convolution initialised to the channel mean.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.mix = None
        if in_channels not in (1, 3):
            self.mix = nn.Conv2d(in_channels, 3, kernel_size=1, bias=False)
            nn.init.constant_(self.mix.weight, 1.0 / in_channels)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if self.mix is not None:
            x = self.mix(x)
        elif self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class SliceClassifier(pl.LightningModule):
    """A torchvision backbone with a ``num_classes`` head over windowed CT slices.

    Args:
        backbone: name in :data:`covidct.models.backbones.BACKBONES` (``vgg16`` is the paper's).
        pretrained: load torchvision's ImageNet weights (never silently skipped).
        weights_path: explicit weights file instead of torch hub's cache.
        in_channels: number of window channels the data provides (``${len:${data.windows}}``).
        loss: factory ``(num_classes, ignore_index) -> nn.Module`` (a Hydra ``_partial_`` of
            :class:`~covidct.models.losses.FocalLoss` or :class:`~covidct.models.losses.CrossEntropyLoss`), called here,
            so a bad loss value fails before any data is read; None = focal loss, gamma 2. A loss with
            ``fit_class_counts`` (``alpha: auto``) gets the training split's class counts in ``setup``.
        optimizer: factory ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``).
        scheduler: factory ``optimizer -> LRScheduler`` or None, stepped once per epoch.
        channels_last: NHWC memory format (about 2x faster for VGG16 on CPU and with AMP on GPU).
        preprocessing: the data settings the model was trained with (windows, image size, label
            mode); saved in the checkpoint so prediction always uses the same ones.
        infection_threshold: a stage-1 model (``class_names`` clean, infected) calls a slice infected when
            P(infected) exceeds it: its validation sensitivity and specificity, and the default threshold
            of its pseudo-labels (``python -m covidct.training.pseudo_label``).

    A stage-1 model also logs ``val/infection/{auroc,sensitivity,specificity}`` over the validation
    slices with a known label (``data.label_mode=infection``).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        weights_path: str | None = None,
        in_channels: int = 1,
        num_classes: int = len(CLASS_NAMES),
        class_names: Sequence[str] = CLASS_NAMES,
        loss: Callable[..., nn.Module] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        channels_last: bool = True,
        preprocessing: Mapping[str, Any] | None = None,
        infection_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        # in the checkpoint only: the loggers get the run's whole config (model.* among it) from train()
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler", "weights_path"], logger=False)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-4))
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        self.adapter = InputAdapter(in_channels)
        # pretrained weights only matter when training starts; a checkpoint brings its own
        self.net = build_backbone(backbone, num_classes, pretrained, weights_path)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.criterion = (loss or FocalLoss)(num_classes=num_classes, ignore_index=UNKNOWN)
        settings = getattr(self.criterion, "settings", None)  # recorded in the checkpoint, as plain data
        self.hparams["loss"] = settings() if settings else {"_target_": type(self.criterion).__qualname__}
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=UNKNOWN)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=UNKNOWN)
        self.val_f1 = MulticlassF1Score(num_classes, average="macro", ignore_index=UNKNOWN)
        self.val_loss = MeanMetric()
        self.infection_metrics: MetricCollection | None = None
        if tuple(class_names) == INFECTION_CLASSES:
            if not 0.0 < infection_threshold < 1.0:
                raise ConfigError(f"model.infection_threshold must be in (0, 1), got {infection_threshold}")
            self.infection_metrics = MetricCollection(
                {
                    "auroc": BinaryAUROC(ignore_index=UNKNOWN),
                    "sensitivity": BinaryRecall(infection_threshold, ignore_index=UNKNOWN),
                    "specificity": BinarySpecificity(infection_threshold, ignore_index=UNKNOWN),
                },
                prefix="val/infection/",
            )
        #: the best validation epoch's patient decisions, set by PatientVoteCallback (read by the report)
        self.patient_votes: ValidationVotes | None = None
        #: the best epoch of a run without patient votes (stage 1), set by BestEpochCallback
        self.best_epoch: BestEpoch | None = None

    def setup(self, stage: str) -> None:
        """Refuse data whose slice classes are not the model's; fit the loss to the training split
        (``loss.alpha=auto``), from ``trainer.datamodule.train_class_counts``."""
        fit = getattr(self.criterion, "fit_class_counts", None)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = list(getattr(datamodule, "class_names", self.hparams.class_names))
        if data_classes != list(self.hparams.class_names):
            raise ConfigError(
                f"the data's slice classes {data_classes} (data.label_mode) are not the model's "
                f"{list(self.hparams.class_names)} (model.class_names): leave model.class_names to its default "
                "${classes:${data.label_mode}}, or resume only with the label mode the checkpoint was trained in"
            )
        if stage == "fit" and fit is not None and datamodule is not None:
            fit(datamodule.train_class_counts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float logits (B, num_classes)."""
        x = self.adapter(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def head(self) -> nn.Linear:
        """The backbone's last linear layer (resnet ``fc``, vgg ``classifier[6]``, efficientnet ``classifier[-1]``)."""
        return [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W) -> (logits (B, num_classes), penultimate features (B, D)), one forward pass:
        a forward pre-hook on :meth:`head` captures its input."""
        captured: list[torch.Tensor] = []
        handle = self.head().register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self(images)
        finally:
            handle.remove()
        return logits, captured[-1].flatten(1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> the slice embeddings: the head's input, float (B, D) (D: 512 resnet18,
        4096 vgg16, 1280 efficientnet_b0)."""
        return self.forward_with_features(images)[1]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.criterion(logits, batch["target"])
        self.train_acc(logits, batch["target"])
        bs = len(logits)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/slice_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Logs the slice loss and metrics; returns float32 ``probs`` (B, C) and ``embedding`` (B, D) (the
        :meth:`features`, from the same forward pass) for the patient vote and its learned rule."""
        logits, embedding = self.forward_with_features(batch["image"])
        target = batch["target"]
        bs = int((target != UNKNOWN).sum())
        if bs:
            self.val_loss.update(self.criterion(logits, target), weight=bs)  # slice-weighted, summed over ranks
            self.log("val/loss", self.val_loss, on_epoch=True, batch_size=bs)
            self.val_acc(logits, target)
            self.val_f1(logits, target)
            self.log("val/slice_acc", self.val_acc, on_epoch=True, batch_size=bs)
            self.log("val/slice_f1_macro", self.val_f1, on_epoch=True, batch_size=bs)
            if self.infection_metrics is not None:
                self.infection_metrics.update(logits.float().softmax(dim=1)[:, INFECTED], target)
                self.log_dict(self.infection_metrics, on_epoch=True, batch_size=bs)
        return {"probs": logits.float().softmax(dim=1).detach(), "embedding": embedding.float().detach()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the W&B run id so that ``ckpt_path=...`` resumes the same W&B run."""
        from pytorch_lightning.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):  # Lightning's or covidct.training.wandb_logger's
                checkpoint["wandb_run_id"] = logger.version

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

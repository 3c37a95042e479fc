"""Typed schema of the train config, registered in Hydra's ConfigStore as ``train_schema``.

``conf/train.yaml`` lists it first in its defaults, so every group file and every command-line override
is merged onto these dataclasses: a wrong type (``data.image_size=abc``) or an unknown key
(``loss.gama=2``) fails during composition, naming the key, before any data is read. Value ranges
and choices (``loss.gamma >= 0``, alpha length, ``vote.rule``) are checked by ``covidct.config.check_config``.

Groups whose keys depend on the choice (optimizer, scheduler, trainer, logger, callbacks) stay open
dictionaries: Lightning and torch validate their own arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SyntheticConfig:
    """``data.synthetic``: the generated COVID-CT-MD look-alike. A mutable mirror of the frozen
    ``covidct.data.synthetic.SyntheticSpec`` (a frozen node would refuse overrides); a test keeps
    the two identical."""

    patients_per_class: list[int] = field(default_factory=lambda: [20, 20, 20])
    slices_min: int = 32
    slices_max: int = 48
    image_size: int = 128
    labelled_fraction: float = 1.0
    compressed_fraction: float = 0.3
    rle_fraction: float = 0.1
    signed_fraction: float = 0.3
    seed: int = 0


@dataclass
class DataConfig:
    """``data``: arguments of ``covidct.data.datamodule.CTDataModule``."""

    _target_: str = "covidct.data.datamodule.CTDataModule"
    root: str | None = None
    synthetic: SyntheticConfig | None = None
    cache_dir: str = MISSING
    output_dir: str = MISSING
    windows: list[Any] = field(default_factory=lambda: ["lung"])  # preset names or {level, width} in HU
    image_size: int = 224
    label_mode: str = "paper"
    val_fraction: float = 0.2
    num_folds: int | None = None
    fold: int = 0
    seed: int = 0
    batch_size: int = 32
    num_workers: int | None = None  # None = auto
    pin_memory: bool | None = None  # None = auto
    prefetch_factor: int = 4
    balanced_sampler: bool = False
    cache_workers: int = 1
    slice_labels_file: str | None = None
    train_transforms: list[Any] = field(default_factory=list)


@dataclass
class ModelConfig:
    """``model``: arguments of ``covidct.models.classifier.SliceClassifier`` chosen in the config."""

    _target_: str = "covidct.models.classifier.SliceClassifier"
    backbone: str = MISSING
    pretrained: bool = False
    weights_path: str | None = None
    channels_last: bool = True


@dataclass
class LossConfig:
    """``loss``: focal loss; ``alpha`` is null, one number, one weight per class, or ``auto``."""

    name: str = "focal"
    gamma: float = 2.0
    alpha: Any = None


@dataclass
class VoteConfig:
    """``vote``: the patient rule that drives checkpointing (every rule is scored) and the rules' parameters:
    ``tau`` (infected_fraction; null = tuned on validation patients), ``k`` (topk_mean: slices averaged per
    class), ``center_slices`` (weighted_center: central slices that count fully)."""

    rule: str = "majority"
    tau: float | None = None
    k: int = 5
    center_slices: int = 40


@dataclass
class CompileConfig:
    """``compile``: ``torch.compile`` the model for training (``mode``: default | reduce-overhead | max-autotune)."""

    enabled: bool = False
    backend: str = "inductor"
    mode: str | None = None


@dataclass
class TrainConfig:
    """The whole ``python train.py`` config."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    loss: LossConfig = MISSING
    vote: VoteConfig = MISSING
    optimizer: dict[str, Any] = MISSING
    scheduler: dict[str, Any] | None = None
    trainer: dict[str, Any] = MISSING
    logger: dict[str, Any] | None = None
    callbacks: dict[str, Any] | None = None
    paths: dict[str, Any] = MISSING
    compile: CompileConfig = field(default_factory=CompileConfig)
    task_name: str = "train"
    seed: int = 42
    ckpt_path: str | None = None
    tags: list[str] = field(default_factory=list)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent); call before composing ``train``."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)

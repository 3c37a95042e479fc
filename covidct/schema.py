"""Typed schema of the train config, registered in Hydra's ConfigStore as ``train_schema``.

``conf/train.yaml`` lists it first in its defaults, so every group file and every command-line override
is merged onto these dataclasses: a wrong type (``data.image_size=abc``) or an unknown key
(``loss.gama=2``) fails during composition, naming the key, before any data is read. Value ranges
and choices (``loss.gamma >= 0``, alpha length, ``vote.rule``) are checked by ``covidct.config.check_config``.

Groups whose keys depend on the choice (optimizer, scheduler, trainer, logger, callbacks) stay open
dictionaries: Lightning and torch validate their own arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from covidct.data.synthetic.spec import SyntheticSpec


def _mutable_mirror(frozen: type, name: str, doc: str) -> type:
    """A plain (mutable) dataclass with the fields, types and defaults of the ``frozen`` dataclass,
    tuples turned into lists: OmegaConf refuses overrides on a frozen node and has no tuple type."""
    hints = get_type_hints(frozen)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(frozen):
        kind, default = hints[f.name], f.default
        if default is dataclasses.MISSING:
            raise TypeError(f"{frozen.__name__}.{f.name}: give it a plain default to mirror it in the schema")
        if get_origin(kind) is tuple:
            items = {a for a in get_args(kind) if a is not Ellipsis}
            kind = list[items.pop() if len(items) == 1 else Any]
            specs.append((f.name, kind, field(default_factory=partial(list, default))))
        else:
            specs.append((f.name, kind, field(default=default)))
    mirror = dataclasses.make_dataclass(name, specs)
    mirror.__module__, mirror.__doc__ = __name__, doc
    return mirror


SyntheticConfig = _mutable_mirror(
    SyntheticSpec,
    "SyntheticConfig",
    """``data.synthetic``: the generated COVID-CT-MD look-alike. Made from the frozen
    ``covidct.data.synthetic.SyntheticSpec`` (fields, types, defaults; tuples as lists), which
    checks the values when the data module builds it.""",
)


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

"""Typed schema of the train config, registered in Hydra's ConfigStore as ``train_schema``.

``conf/train.yaml`` lists it first in its defaults, so every group file and every command-line override
is merged onto these dataclasses: a wrong type (``data.image_size=abc``) or an unknown key
(``loss.gama=2``) fails during composition, naming the key, before any data is read. The schema holds
types only: every default lives in one YAML file. Value ranges and choices (``loss.gamma >= 0``,
alpha length, ``vote.rule``) are checked by the constructors the config builds.

Groups whose keys depend on the choice (loss, optimizer, scheduler, trainer, logger, callbacks) stay
open dictionaries: their constructors (ours, Lightning's, torch's) check their own arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from covidct.data.synthetic.spec import SyntheticSpec
from covidct.patients.mil_features import DEFAULT_MIL_FEATURES
from covidct.patients.parameters import CENTER_SLICES, TOP_K, WINDOW_SLICES


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


# Every value below is MISSING: the YAML files in conf/ are the one source of every default, and the
# schema gives only the types. (tests/test_config_schema.py composes every choice of every group.)


@dataclass
class DataConfig:
    """``data``: arguments of ``covidct.data.datamodule.CTDataModule`` (defaults: ``conf/data/*.yaml``)."""

    _target_: str = MISSING
    root: str | None = MISSING
    synthetic: SyntheticConfig | None = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING
    windows: list[Any] = MISSING  # preset names or {level, width} in HU
    image_size: int = MISSING
    lung_crop: bool = MISSING
    label_mode: str = MISSING
    val_fraction: float = MISSING
    split_file: str | None = MISSING
    num_folds: int | None = MISSING
    fold: int = MISSING
    seed: int = MISSING
    batch_size: int = MISSING
    num_workers: int | None = MISSING  # None = auto
    pin_memory: bool | None = MISSING  # None = auto
    prefetch_factor: int = MISSING
    balanced_sampler: bool = MISSING
    cache_workers: int = MISSING
    slice_labels_file: str | None = MISSING
    pseudo_labels: str | None = MISSING
    train_transforms: list[Any] = MISSING
    series: str = MISSING  # auto | a part of SeriesDescription / ConvolutionKernel
    min_slices: int = MISSING


@dataclass
class PreprocessingConfig:
    """``model.preprocessing``: the data settings saved in the checkpoint (interpolated from ``data``, ``vote``)."""

    windows: list[Any] = MISSING
    image_size: int = MISSING
    lung_crop: bool = MISSING
    label_mode: str = MISSING
    vote_rule: str = MISSING


@dataclass
class ModelConfig:
    """``model``: arguments of ``covidct.models.classifier.SliceClassifier`` (defaults: ``conf/model/*.yaml``)."""

    _target_: str = MISSING
    backbone: str = MISSING
    pretrained: bool = MISSING
    weights_path: str | None = MISSING
    channels_last: bool = MISSING
    in_channels: int = MISSING
    class_names: list[str] = MISSING
    num_classes: int = MISSING
    infection_threshold: float = MISSING
    preprocessing: PreprocessingConfig = MISSING


@dataclass
class VoteConfig:
    """``vote``: the patient rule that drives checkpointing (every rule is scored) and the rules' parameters:
    ``tau`` (infected_fraction and threshold; null = tuned on validation patients), ``k`` (topk_mean: slices
    averaged per class), ``center_slices`` / ``window_slices`` (weighted_center: central slices that count
    fully / that vote at all), ``slice_threshold`` (threshold: infected probability of an infected slice;
    null = tuned), ``from_ckpt`` (take those parameters, fixed, from a checkpoint: runs with data.val_fraction=0),
    ``mil`` (fit and score the learned ``mil`` rule every validation epoch; on whenever ``rule`` is ``mil``),
    ``mil_features`` (what its head reads of each slice: embeddings | log_probs, :mod:`covidct.patients.mil_features`).
    Only the rules that use them set them in their file; the others take the values here."""

    rule: str = MISSING
    tau: float | None = MISSING
    k: int = TOP_K
    center_slices: int = CENTER_SLICES
    window_slices: int = WINDOW_SLICES
    slice_threshold: float | None = None
    from_ckpt: str | None = None
    mil: bool = True
    mil_features: str = DEFAULT_MIL_FEATURES


@dataclass
class CompileConfig:
    """``compile``: ``torch.compile`` the model for training (``mode``: default | reduce-overhead | max-autotune)."""

    enabled: bool = MISSING
    backend: str = MISSING
    mode: str | None = MISSING


@dataclass
class PrivacyConfig:
    """``privacy``: pseudonyms for the patient ids logged to W&B (see ``covidct.training.privacy``):
    ``pseudonymize`` auto | true | false, ``secret_file`` (the HMAC key, made on first use),
    ``mapping_file`` (write ``pseudonyms.csv`` into the run folder), ``pseudonym_length`` (hex digits)."""

    pseudonymize: str = MISSING  # auto | true | false (an override's true arrives as "True")
    secret_file: str = MISSING
    mapping_file: bool = MISSING
    pseudonym_length: int = MISSING


@dataclass
class TrainConfig:
    """The whole ``python train.py`` config (defaults: ``conf/train.yaml`` and its groups)."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    loss: dict[str, Any] = MISSING  # a partial constructor: its keys depend on the choice (focal, ce)
    vote: VoteConfig = MISSING
    optimizer: dict[str, Any] = MISSING
    scheduler: dict[str, Any] | None = MISSING
    trainer: dict[str, Any] = MISSING
    logger: dict[str, Any] | None = MISSING
    callbacks: dict[str, Any] | None = MISSING
    paths: dict[str, Any] = MISSING
    compile: CompileConfig = MISSING
    calibration: bool = MISSING
    task_name: str = MISSING
    seed: int = MISSING
    ckpt_path: str | None = MISSING
    tags: list[str] = MISSING
    privacy: PrivacyConfig = MISSING


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent); call before composing ``train``."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)

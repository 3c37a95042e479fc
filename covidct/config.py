"""Config helpers shared by the entry points and tests: resolvers, the schema, and value checks made
before any data is read (types are checked by the schema in ``covidct.schema`` while composing)."""

from __future__ import annotations

import math
import secrets
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from covidct import CLASS_NAMES
from covidct.data.labels import LABEL_MODES
from covidct.errors import ConfigError
from covidct.losses import LOSS_NAMES, resolve_alpha, validate_gamma
from covidct.models.backbones import BACKBONES
from covidct.schema import register_configs
from covidct.voting import check_vote_settings


def register_resolvers() -> None:
    """``${run_suffix:}``: a random 6-hex suffix, fixed per composed config (and copied to every
    job of a sweep by Hydra, like ``${now:}``), so run folders never collide. Also registers the
    train schema (``train_schema``) in Hydra's ConfigStore."""
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", lambda: secrets.token_hex(3), use_cache=True)
    register_configs()


def _choice(key: str, value: object, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not known; choose one of {sorted(choices)}")


def check_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on values that would otherwise fail after data preparation."""
    _choice("loss.name", cfg.loss.name, LOSS_NAMES)
    validate_gamma(cfg.loss.gamma)
    if cfg.loss.alpha != "auto":
        resolve_alpha(cfg.loss.alpha, None, len(CLASS_NAMES))
    _choice("model.backbone", cfg.model.backbone, BACKBONES)
    check_vote_settings(cfg.vote.rule, cfg.vote.tau, cfg.vote.k, cfg.vote.center_slices)
    data = cfg.data
    _choice("data.label_mode", data.label_mode, LABEL_MODES)
    size = data.image_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 32:
        raise ConfigError(f"data.image_size must be an integer >= 32 (px), got {size!r}")
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {data.batch_size}")
    if data.num_folds is None:
        if not 0.0 < data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {data.val_fraction}")
    elif data.num_folds < 2 or not 0 <= data.fold < data.num_folds:
        raise ConfigError(
            f"k-fold needs data.num_folds >= 2 and 0 <= data.fold < data.num_folds, "
            f"got num_folds={data.num_folds}, fold={data.fold}"
        )
    if data.root is None and data.synthetic is None:
        raise ConfigError("data.root is not set: give data.root=/path/to/COVID-CT-MD, or use data=synthetic")
    if data.root is not None and not Path(data.root).is_dir():
        raise ConfigError(f"data.root={data.root!r} is not a folder; point it at a COVID-CT-MD folder")
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a positive number, got {lr!r}")

"""Config helpers shared by the entry points and tests: resolvers and checks made before any data is read."""

from __future__ import annotations

import secrets

from omegaconf import DictConfig, OmegaConf

from covidct import CLASS_NAMES
from covidct.errors import ConfigError
from covidct.losses import resolve_alpha, validate_gamma
from covidct.models.backbones import BACKBONES


def register_resolvers() -> None:
    """``${run_suffix:}``: a random 6-hex suffix, fixed per composed config (and copied to every
    job of a sweep by Hydra, like ``${now:}``), so run folders never collide."""
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", lambda: secrets.token_hex(3), use_cache=True)


def check_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on values that would otherwise fail after data preparation."""
    validate_gamma(cfg.loss.gamma)
    if cfg.loss.alpha != "auto":
        resolve_alpha(cfg.loss.alpha, None, len(CLASS_NAMES))
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone={cfg.model.backbone!r} is not known; choose one of {sorted(BACKBONES)}")
    size = cfg.data.image_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 32:
        raise ConfigError(f"data.image_size must be an integer >= 32 (px), got {size!r}")

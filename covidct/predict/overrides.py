"""predict.py's options applied to the model's settings: ``vote=<rule>``, ``tau``, ``slice_threshold`` and
``calibration`` over the checkpoint's vote (each recorded with the value it replaced), and the reading options
``series``, ``min_slices``, ``tta`` and ``tta_transforms``."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from covidct.data.series import AUTO, check_min_slices, check_series_rule
from covidct.errors import ConfigError
from covidct.patients.rules import LEARNED_RULES, check_vote_parameters, check_vote_settings
from covidct.predict.settings import PredictorSettings
from covidct.predict.tta import tta_views


def check_vote_overrides(cfg) -> tuple[Any, Any, Any, Any]:
    """(rule, k, center_slices, window_slices) of ``vote=<rule>`` (None where not given), checked with
    ``slice_threshold`` and ``tau`` before the model is loaded."""
    chosen = cfg.get("vote") or {}  # vote=<rule>: that file's rule and parameters override the checkpoint's
    rule, k, center_slices, window_slices = (chosen.get(key) for key in ("rule", "k", "center_slices", "window_slices"))
    check_vote_settings(rule, None, k, center_slices, window_slices, cfg.get("slice_threshold"))
    if cfg.tau is not None and not 0.0 <= float(cfg.tau) <= 1.0:
        raise ConfigError(f"tau must be in [0, 1] or null (the checkpoint's), got {cfg.tau}")
    return rule, k, center_slices, window_slices


def apply_vote_overrides(cfg, settings: PredictorSettings, chosen: tuple[Any, Any, Any, Any]) -> None:
    """Set the user's vote rule, tau, slice threshold, calibration and vote parameters (``chosen``: from
    :func:`check_vote_overrides`) on ``settings``, each recorded in ``settings.overridden`` with the
    checkpoint's value; the result is checked as a whole."""
    rule, k, center_slices, window_slices = chosen
    overrides = (
        ("vote_rule", rule),
        ("tau", cfg.tau),
        ("threshold_tau", cfg.tau),
        ("slice_threshold", cfg.get("slice_threshold")),
        ("temperature", None if cfg.get("calibration", True) else 1.0),
        ("k", k),
        ("center_slices", center_slices),
        ("window_slices", window_slices),
    )
    for attr, value in overrides:
        if value is not None:
            settings.overridden[attr] = {"checkpoint": getattr(settings, attr), "used": value}
            setattr(settings, attr, value)
    if settings.overridden:  # the overrides beside the checkpoint's other values (window_slices >= center_slices)
        check_vote_parameters(settings.vote)
    if settings.vote_rule in LEARNED_RULES and settings.mil_head is None:
        raise ConfigError(
            f"vote rule {settings.vote_rule}: ckpt_path={cfg.ckpt_path} holds no fitted MIL head (a checkpoint from "
            "before the mil rule, or of a run without validation patients); choose another vote=<rule>"
        )


def apply_reading_options(cfg, settings: PredictorSettings) -> None:
    """Set ``series``, ``min_slices``, ``tta`` and ``tta_transforms`` (checked, and their built views) on
    ``settings``."""
    settings.series = check_series_rule(cfg.get("series", AUTO), "series")
    settings.min_slices = check_min_slices(cfg.get("min_slices", 1), "min_slices")
    settings.tta = bool(cfg.get("tta", False))
    transforms = cfg.get("tta_transforms") or []
    settings.tta_transforms = (
        OmegaConf.to_container(transforms, resolve=True) if OmegaConf.is_config(transforms) else list(transforms)
    )
    settings.tta_views = tta_views(settings.tta_transforms)

"""Command-line behaviour shared by the Hydra entry points (train.py, predict.py, python -m covidct.*).

:class:`MandatoryKeysCheck` is a Hydra callback (``hydra.callbacks.mandatory_keys`` in
``conf/hydra/default.yaml``): a mandatory key (``???``) left unset ends the command in one usage line
and exit 1, before Hydra creates the run or sweep folder (a check in the task function comes too late:
Hydra has made the folder by then). A callback and not a look at ``sys.argv``: it sees the config that
Hydra composed, so every way of setting a key counts (``key=v``, ``++key=v``, quoting, ``--config-dir``,
a sweep ``-m key=a,b``), and ``--help``, ``--cfg job``, ``--info`` never reach it (Hydra only calls
callbacks when a run or a multirun starts).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

USAGE: dict[str, str] = {
    "predict": "python predict.py ckpt_path=<run>/checkpoints/<best>.ckpt "
    "input=<patient folder | test set | folder of test sets>",
    "evaluate": "python -m covidct.predict.evaluate predictions=<predict.py run folder | test set CSV> "
    "labels=<patient,class CSV>",
    "pseudo_label": "python -m covidct.training.pseudo_label ckpt_path=<stage-1 run>/checkpoints/<best>.ckpt "
    "input=<dataset root>",
    "bench_predict": "python -m covidct.bench.predict input=<patient folder | test set | folder of test sets>",
    "export": "python -m covidct.predict.export ckpt_path=<run>/checkpoints/<best>.ckpt",
}
"""Config name -> the command with its mandatory keys (what to type)."""

_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log lines


def missing_keys(config: DictConfig) -> list[str]:
    """The app's keys whose value is mandatory and unset (``???``), in the config's order; ``hydra.*``
    (Hydra's own, filled in as the run starts) left out. Nothing is resolved: an interpolation may
    need what only the run sets up (``${hydra:runtime.output_dir}``)."""
    found: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
        elif value == "???":
            found.append(path)

    container = OmegaConf.to_container(config, resolve=False)
    assert isinstance(container, dict)
    walk({key: value for key, value in container.items() if key != "hydra"}, "")
    return found


def usage_error(config_name: str | None, missing: list[str]) -> str:
    """``<keys> not set: <the command with its mandatory keys>``, one line."""
    usage = USAGE.get(config_name or "") or " ".join(f"{key}=<value>" for key in missing)
    return f"{' and '.join(missing)} not set: {usage} [key=value ...]; --help lists the keys"


def exit_if_keys_missing(cfg: DictConfig, config_name: str, log: logging.Logger) -> None:
    """The task function's own check, the same usage line and exit 1, for when :class:`MandatoryKeysCheck` is
    switched off (``~hydra.callbacks.mandatory_keys``): every entry point says it the same way."""
    if missing := missing_keys(cfg):
        log.error("%s", usage_error(config_name, missing))
        sys.exit(1)


def _given_by_sweep(config: DictConfig) -> set[str]:
    """Keys that a multirun sets per job, absent from the config Hydra composes for the sweep itself:
    sweep overrides (``-m input=a,b``) and a sweeper's search space (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: set[str] = set()
    try:
        overrides = OverridesParser.create().parse_overrides(
            list(OmegaConf.select(config, "hydra.overrides.task") or [])
        )
        keys |= {o.key_or_group for o in overrides if not o.is_delete()}
    except Exception:  # Hydra parsed them already; never fail a check on a second parse
        pass
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if isinstance(params, DictConfig):
        keys |= {str(key) for key in params}
    return keys


def _stop(config: DictConfig, config_name: str | None, missing: list[str]) -> None:
    fmt = OmegaConf.select(config, "hydra.job_logging.formatters.simple.format", default=None) or _LOG_FORMAT
    logger = logging.Logger(str(OmegaConf.select(config, "hydra.job.name", default=None) or config_name))
    handler = logging.StreamHandler(sys.stderr)  # Hydra's job logging is configured only once the run starts
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.error("%s", usage_error(config_name, missing))
    raise SystemExit(1)  # Hydra turns any Exception raised in a callback into a warning


class MandatoryKeysCheck(Callback):
    """Hydra callback: before a run or a multirun starts, every mandatory key (``???``) of the app's
    config must be set; if not, one usage line on stderr and exit 1, and no output folder."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if missing := missing_keys(config):
            _stop(config, config_name, missing)

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if missing := missing_keys(config):  # the sweep's config lacks what the sweep sets per job
            given = _given_by_sweep(config)
            if missing := [key for key in missing if key not in given]:
                _stop(config, config_name, missing)

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

import difflib
import logging
import sys
from pathlib import Path
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


# ---- typos on the command line ---------------------------------------------------------------------------
def exit_on_typo(config_name: str, args: list[str] | None = None) -> None:
    """Before Hydra starts: a misspelt group choice or key on the command line (``sys.argv``) ends it in one
    line with the nearest spelling (:func:`override_typo`) and exit 1, before any output folder exists."""
    from covidct.contracts import CONF_DIR

    if problem := override_typo(sys.argv[1:] if args is None else args, CONF_DIR, config_name):
        sys.stderr.write(f"Error: {problem}\n")
        sys.exit(1)


_CONFIG_ARGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--experimental-rerun")


def override_typo(args: list[str], conf_dir: Path, config_name: str) -> str | None:
    """One line for a command line's misspelt group choice (``model=vgg``) or key (``loss.gama=2``), with the
    nearest spelling(s); None when Hydra composes ``config_name`` with these overrides (or fails for another
    reason, which Hydra reports itself). Hydra's own answers are a 15-line block for the first and a
    suggestion of ``+loss.gama=2`` for the second, a new key that nothing reads.

    Composes once (~0.2 s): sweep values (``-m loss.gamma=0,1``) are checked one by one against the choices or
    the composed config, not composed.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if any(a.split("=")[0] in _CONFIG_ARGS for a in args):
        return None  # another config than conf/<config_name>.yaml
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # Hydra reports its own syntax errors
        return None
    single = [o for o in overrides if not o.is_sweep_override()]

    def composed(skip: str | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
            kept = [o for o in single if skip is None or not f"{o.key_or_group}.".startswith(f"{skip}.")]
            return compose(config_name, overrides=[o.input_line for o in kept])

    try:
        cfg = composed()
    except MissingConfigException as exc:
        group, _, choice = (exc.missing_cfg_file or "").rpartition("/")
        return _nearest(f"{group}={choice}", choice, list(exc.options or []), f"a choice of {group}") if group else None
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if not (isinstance(cause, ConfigKeyError | ConfigAttributeError) and cause.full_key):
            return None  # a value of the wrong type, ...: Hydra's message names the key
        try:
            rest = composed(skip=cause.full_key)
        except Exception:
            return None
        return _missing_key(cause.full_key, rest) if _first_absent(rest, cause.full_key) else None
    except Exception:
        return None
    for o in overrides:
        if not o.is_sweep_override() or o.key_or_group.startswith("hydra.") or o.is_add():
            continue
        if "." not in o.key_or_group and (conf_dir / o.key_or_group).is_dir():
            options = sorted(p.stem for p in (conf_dir / o.key_or_group).glob("*.yaml"))
            for choice in o.sweep_string_iterator():
                if choice not in options:
                    return _nearest(f"{o.key_or_group}={choice}", choice, options, f"a choice of {o.key_or_group}")
        elif first := _first_absent(cfg, o.key_or_group):
            return _missing_key(first, cfg)
    return None


def _first_absent(cfg: DictConfig, dotted: str) -> str | None:
    """The shortest prefix of ``dotted`` (``a.b.c``) that ``cfg`` has no key for; None when every part is there
    (a mandatory ``???`` value counts as there)."""
    node: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return ".".join(parts[: i + 1])
        node = node._get_node(part)
    return None


def _nearest(given: str, name: str, candidates: list[str], what: str) -> str:
    """``<given>: <name> is not <what>; did you mean <nearest>?`` with every candidate when few."""
    near = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(near)}?" if near else "no close spelling"
    listed = f" (choices: {', '.join(candidates)})" if len(candidates) <= 12 else ""
    return f"{given}: {name} is not {what}; {hint}{listed}"


def _missing_key(full_key: str, cfg: DictConfig | None) -> str:
    """The line for an override of a key the config does not have, with the nearest keys of its parent."""
    parent, _, leaf = full_key.rpartition(".")
    siblings: list[str] = []
    if cfg is not None:
        node = OmegaConf.select(cfg, parent) if parent else cfg
        siblings = [str(k) for k in node] if isinstance(node, DictConfig) else []
    near = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(f'{parent}.{n}' if parent else n for n in near)}?" if near else ""
    return f"{full_key} is not a key of the config; {hint or 'no close spelling'} (--cfg job prints every key)"

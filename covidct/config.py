"""Config helpers shared by the entry points and tests: resolvers, the schema, and value checks made
before any data is read (types are checked by the schema in ``covidct.schema`` while composing)."""

from __future__ import annotations

import math
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from covidct.errors import ConfigError
from covidct.schema import register_configs


def register_resolvers() -> None:
    """``${run_suffix:}``: a random 6-hex suffix, fixed per composed config (and copied to every
    job of a sweep by Hydra, like ``${now:}``), so run folders never collide; ``${len:x}``;
    ``${classes:<label mode>}`` (the slice classes a label mode trains); ``${contract:NAME}``;
    ``${cpu_precision:}`` (:func:`covidct.hardware.cpu_training_precision`). Also
    registers the train schema (``train_schema``) in Hydra's ConfigStore."""
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("len"):  # ${len:${data.windows}}: the model's input channels
        OmegaConf.register_new_resolver("len", len)
    if not OmegaConf.has_resolver("classes"):  # ${classes:${data.label_mode}}: the model's slice classes
        from covidct.data.labels import class_names_of

        OmegaConf.register_new_resolver("classes", class_names_of)
    if not OmegaConf.has_resolver("contract"):  # ${contract:PATIENT_ACC}: a name of covidct.contracts
        OmegaConf.register_new_resolver("contract", contract_value)
    if not OmegaConf.has_resolver("cpu_precision"):  # ${cpu_precision:}: bf16-mixed where the CPU has it natively
        from covidct.hardware import cpu_training_precision

        OmegaConf.register_new_resolver("cpu_precision", cpu_training_precision, use_cache=True)
    register_configs()


def contract_value(name: str) -> str:
    """``${contract:NAME}``: the string constant ``NAME`` of :mod:`covidct.contracts` (one spelling for
    Python and YAML); an unknown name is a ConfigError naming it."""
    from covidct import contracts

    value = getattr(contracts, name, None)
    if not isinstance(value, str):
        known = sorted(k for k, v in vars(contracts).items() if k.isupper() and isinstance(v, str))
        raise ConfigError(f"${{contract:{name}}}: not a name of covidct.contracts; known: {known}")
    return value


def _choice(key: str, value: object, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not known; choose one of {sorted(choices)}")


def check_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on the values no constructor checks (the trainer's epochs, the
    optimizer's learning rate, which torch checks only once training starts). Every other value is
    checked by the constructor it is for (``CTDataModule``, ``SliceClassifier`` and its backbone,
    ``FocalLoss``, ``PatientVoteCallback``), which ``covidct.training.run.build_run`` calls before any data
    is read."""
    trainer = cfg.get("trainer") or {}
    if not trainer.get("fast_dev_run"):  # fast_dev_run ignores both
        for key in ("max_epochs", "max_steps"):
            if trainer.get(key) == 0:
                raise ConfigError(
                    f"trainer.{key}=0: nothing to train; give trainer.{key} >= 1 "
                    "(e.g. trainer.max_epochs=8), or debug=fast for one batch of each"
                )
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a positive number, got {lr!r}")


def _experiment_data(conf_dir: Path, name: str, depth: int = 0) -> str:
    """The data group an experiment selects (following the experiments it builds on), ``synthetic`` if none."""
    path = conf_dir / "experiment" / f"{name}.yaml"
    defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if path.is_file() else []
    data = "synthetic"
    for item in defaults:
        if isinstance(item, str) and item != "_self_" and depth < 8:
            data = _experiment_data(conf_dir, item, depth + 1)
        elif isinstance(item, dict) and "override /data" in item:
            data = str(item["override /data"])
    return data


def synthetic_override_conflict(args: list[str], conf_dir: Path) -> str | None:
    """The one-line error for ``data.synthetic.*`` overrides on a command line whose data group is
    ``covid_ct_md`` (``data=covid_ct_md``, or an experiment such as ``paper`` that selects it); None if fine.

    Checked on the command line before Hydra composes: ``covid_ct_md`` sets ``data.synthetic`` to null,
    and Hydra applies such an override with an AssertionError traceback that does not name the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # Hydra reports its own syntax errors
        return None
    values: dict[str, list[str]] = {}
    for o in overrides:
        if not o.is_delete():
            values[o.key_or_group] = (
                list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            )
    leftover = [o.input_line for o in overrides if o.key_or_group.startswith("data.synthetic")]
    if not leftover:
        return None
    data = set(values.get("data") or [_experiment_data(conf_dir, e) for e in values.get("experiment", ["demo"])])
    if "covid_ct_md" not in data:
        return None
    return (
        f"{leftover[0]}: data=covid_ct_md reads the real data in data.root and has no data.synthetic settings; "
        f"drop {' '.join(leftover)} (or use data=synthetic)"
    )


class OutputDirCheck(Callback):
    """Hydra callback: before a run (or a multirun) starts, check that its output folder can be created and
    written. If not: one line on stderr and exit 1 (Hydra would fail with a traceback from its mkdir)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config, "hydra.sweep.dir")


def _check_writable(config: DictConfig, key: str) -> None:
    try:
        folder = Path(str(OmegaConf.select(config, key)))
    except Exception:  # an interpolation only Hydra can resolve later: Hydra reports it
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        sys.stderr.write(
            f"Error: {key}={folder}: the output folder cannot be created or written ({reason}); "
            "choose another with paths.log_dir=<folder> or " + key + "=<folder>\n"
        )
        raise SystemExit(1) from None  # Hydra turns any Exception raised in a callback into a warning

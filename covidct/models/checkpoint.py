"""Read checkpoints safely: tensors and plain data only, never arbitrary pickled objects. Every file that is
not a covidct checkpoint (empty, text, random bytes, a plain ``state_dict``) is refused in one line."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from covidct.contracts import CHECKPOINTS_HINT
from covidct.errors import ConfigError, DataError
from covidct.io import atomic_write_with, require_file

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTO = 0x80  # the first byte of torch.save's legacy format (a pickle, protocol >= 2)
WHERE = "use <run>/checkpoints/last.ckpt or epochNNN.ckpt written by train.py"


def sniff(path: Path) -> str | None:
    """Why ``path`` cannot be a PyTorch checkpoint, judging by its first bytes; None when it may be one."""
    with path.open("rb") as f:
        head = f.read(4096)
    if not head:
        return "empty file"
    if head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTO:
        return None
    text = _utf8(head)
    if text is None or "\x00" in text:
        return "binary data, neither a zip archive (torch.save) nor a pickle"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith(("{", "[")):
        return "a JSON file"
    if any(sep in first for sep in ",;\t"):
        return "a CSV file"
    return "a text file"


def _utf8(head: bytes) -> str | None:
    """``head`` as UTF-8 text (a character cut at its end is fine), None when it is not."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def check_structure(ckpt: Any, where: str) -> None:
    """Refuse what torch could read but is no covidct checkpoint: covidct reads ``state_dict`` and
    ``hyper_parameters['preprocessing']`` (windows, image size) from every checkpoint."""
    if not isinstance(ckpt, dict):
        raise DataError(
            f"{where}: not a covidct/Lightning checkpoint: it holds a {type(ckpt).__name__}, "
            f"not a dict with state_dict and hyper_parameters; {WHERE}."
        )
    if "state_dict" not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise DataError(
            f"{where}: a plain state_dict ({len(ckpt)} tensors, e.g. {next(iter(ckpt))!r}), not a covidct/Lightning "
            "checkpoint: it has no hyper_parameters (backbone, windows, image size) to build the model and "
            f"preprocess slices with; {WHERE}."
        )
    missing = [key for key in ("state_dict", "hyper_parameters") if key not in ckpt]
    if missing:
        raise DataError(
            f"{where}: not a covidct/Lightning checkpoint: it has no {' and no '.join(missing)} "
            f"(its keys: {sorted(map(str, ckpt))[:8]}); {WHERE}."
        )
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, dict) or not isinstance(hp.get("preprocessing"), dict):
        raise DataError(
            f"{where}: a Lightning checkpoint not written by covidct's train.py: its hyper_parameters "
            f"have no 'preprocessing' (windows, image size); {WHERE}."
        )


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint dict at ``path`` (tensors on the CPU), read with torch's weights-only unpickler.

    A file whose pickle names any other Python object (a GLOBAL, e.g. ``os.system``: a payload that
    would run code when loaded) is refused with :class:`DataError`, as is a missing, cut-short or
    foreign file (empty, text, JSON, random bytes), a plain ``state_dict`` and a Lightning checkpoint
    without covidct's ``hyper_parameters['preprocessing']``; ``key`` is the config key the path came
    from, for the message. covidct's own checkpoints hold only tensors and plain data.
    """
    path = Path(path)
    where = f"{key}={path}"
    require_file(path, key, CHECKPOINTS_HINT)
    try:
        problem = sniff(path)
    except OSError as exc:
        raise DataError(f"{where}: cannot be read ({_first_line(exc)}).") from None
    if problem:
        raise DataError(f"{where}: not a PyTorch checkpoint ({problem}); {WHERE}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), None)
        if code is None:  # a malformed pickle, not a forbidden object
            raise DataError(
                f"{where}: not a readable PyTorch checkpoint ({_first_unpickler_line(exc)}); {WHERE}."
            ) from None
        raise DataError(
            f"{where}: refused: the file holds Python objects other than tensors and plain data, which "
            f"could run code when loaded ({code}). covidct never writes such objects: the file was changed or "
            "comes from elsewhere. Use a checkpoint from a source you trust."
        ) from None
    except Exception as exc:  # torch reports foreign and cut-short files with many exception types
        raise DataError(
            f"{where}: not a readable PyTorch checkpoint ({_first_line(exc)}): it is cut short or not a "
            "checkpoint; use another one from <run>/checkpoints/."
        ) from None
    check_structure(ckpt, where)
    return ckpt


def update_callback_state(path: str | Path, state_key: str, values: dict[str, Any], epoch: int) -> bool:
    """Merge ``values`` into what the callback ``state_key`` saved in the checkpoint at ``path``, if that checkpoint
    is epoch ``epoch``'s; the file is replaced atomically. Returns whether it was written."""
    ckpt = read_checkpoint(path)
    states = ckpt.get("callbacks", {})
    if ckpt.get("epoch") != epoch or state_key not in states:
        return False
    states[state_key] = dict(states[state_key]) | values
    atomic_write_with(path, lambda f: torch.save(ckpt, f))
    return True


def _first_unpickler_line(exc: pickle.UnpicklingError) -> str:
    """torch's weights-only error is a paragraph; its reason is the line after 'WeightsUnpickler error'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    after = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line), None)
    return f"malformed pickle: {after}" if after else _first_line(exc)


def _windows(spec: Any) -> Any:
    """Windows as (level, width) pairs, so that ``lung`` equals ``{level: -600, width: 1500}``."""
    from covidct.data.preprocess import parse_windows

    try:
        return parse_windows(spec)
    except (ConfigError, TypeError, ValueError):
        return spec


def check_resume_settings(ckpt: dict[str, Any], cfg: DictConfig, source: str) -> None:
    """Refuse resuming ``ckpt`` (read by :func:`read_checkpoint`; ``source`` is its path) with a config that
    changes what the run learns or how its best epoch is chosen.

    * input or network: ``data.windows``, ``data.image_size``, ``data.lung_crop`` (False in checkpoints from
      before it), ``model.backbone``: training on would feed the restored weights different inputs, or load
      a state_dict into another architecture;
    * targets: ``data.label_mode``: the slices' targets (and with ``infection`` the classes) would change;
    * selection: ``vote.rule``: the best checkpoint so far was chosen by the checkpoint's rule, whose
      accuracy is not comparable with another rule's (every rule is scored every epoch anyway).

    Keys a checkpoint predates are not checked. Raises :class:`ConfigError` naming every key that differs,
    both values and why.
    """
    hp, pre = ckpt["hyper_parameters"], ckpt["hyper_parameters"]["preprocessing"]
    windows = OmegaConf.to_container(cfg.data.windows, resolve=True)
    lung_crop = bool(pre.get("lung_crop", False))
    pairs = [
        ("data.windows", pre.get("windows"), windows, _windows(pre.get("windows")) != _windows(windows)),
        ("data.image_size", pre.get("image_size"), cfg.data.image_size, pre.get("image_size") != cfg.data.image_size),
        ("data.lung_crop", lung_crop, cfg.data.lung_crop, lung_crop != cfg.data.lung_crop),
        ("model.backbone", hp.get("backbone"), cfg.model.backbone, hp.get("backbone") != cfg.model.backbone),
    ]
    for key, saved in (("data.label_mode", pre.get("label_mode")), ("vote.rule", pre.get("vote_rule"))):
        now = OmegaConf.select(cfg, key)
        pairs.append((key, saved, now, saved is not None and saved != now))
    differ = [f"{key}: checkpoint {saved!r}, this run {now!r}" for key, saved, now, different in pairs if different]
    if differ:
        raise ConfigError(
            f"ckpt_path={source} cannot be resumed with these settings ({'; '.join(differ)}): the checkpoint's "
            "network was trained on other input or targets, or its best epoch so far was chosen by another vote "
            "rule. Resume with the checkpoint's values, or start a new run without ckpt_path."
        )

"""Pseudonyms for the patient ids (folder names) that leave the machine through Weights & Biases.

Patients are named by their folder, and hospital exports often name folders by the patient ID, the
accession number or the name itself (``DOE^JANE_1965``, ``MRN004211``). With ``privacy.pseudonymize``
on, every patient id that the W&B callbacks log (tables, image captions, text drawn into images, the
run report's page) is replaced by a keyed hash: ``pt-`` + the first ``privacy.pseudonym_length`` hex
digits of HMAC-SHA256(secret, folder name). The secret is read from ``privacy.secret_file`` (created
with 32 random bytes, mode 0600, on first use; never logged), so the same secret gives the same
pseudonyms in every run and results can be joined locally, and nobody without the secret can turn a
pseudonym back into a name. W&B's console capture is switched off too (log lines name patients).

``auto`` (the default) pseudonymizes exactly when a WandbLogger runs online (``offline: false``).
Local files in the run folder (patients.csv, report.html, split.csv, data summary, checkpoints,
predict.py's CSVs) keep the real folder names: they stay on the machine, and a clinician needs them.
``privacy.mapping_file=true`` writes ``pseudonyms.csv`` (patient, pseudonym) into the run folder.

The one entry point from training is :func:`instantiate_logger`; callbacks that log to W&B ask
:func:`pseudonymizer_of` (a logger) for the function to apply to each patient id.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from covidct.contracts import PSEUDONYMS_FILE
from covidct.errors import ConfigError
from covidct.io import atomic_write_csv

log = logging.getLogger(__name__)

#: the attribute of a WandbLogger that carries its :class:`Pseudonymizer`
ATTRIBUTE = "covidct_pseudonymizer"
#: written into the run folder with ``privacy.mapping_file=true``
PREFIX = "pt-"
MIN_SECRET_BYTES = 16

#: (pattern, what it looks like): folder-name shapes that are usually identifiers
IDENTIFIER_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\^"), "a DICOM person name ('^')"),
    (
        re.compile(r"(?<!\d)(?:19|20)\d\d([-./_]?)(?:0[1-9]|1[0-2])\1(?:0[1-9]|[12]\d|3[01])(?!\d)"),
        "a date",
    ),
    (re.compile(r"(?<!\d)(?:0?[1-9]|[12]\d|3[01])[-./](?:0?[1-9]|1[0-2])[-./](?:19|20)?\d\d(?!\d)"), "a date"),
    (re.compile(r"\d{6,}"), "a run of 6 or more digits (record or accession number?)"),
)


def identifier_shapes(names: Iterable[str]) -> list[tuple[str, str]]:
    """(name, what it looks like) of each name shaped like an identifier: a DICOM person name (``^``),
    a date (``19650312``, ``1965-03-12``, ``12.03.1965``) or a run of 6 or more digits (``MRN004211``)."""
    found = []
    for name in names:
        why = next((what for pattern, what in IDENTIFIER_SHAPES if pattern.search(name)), None)
        if why is not None:
            found.append((name, why))
    return found


def pseudonymizing(setting: Any, online: bool) -> bool:
    """``privacy.pseudonymize`` (auto | true | false) for a W&B run that is ``online`` or not."""
    value = str(setting).strip().lower()
    if value == "auto":
        return online
    if value in ("true", "false"):
        return value == "true"
    raise ConfigError(f"privacy.pseudonymize must be auto, true or false, got {setting!r}")


def load_secret(path: str | Path) -> bytes:
    """The secret in ``path`` (``~`` expanded), created first when absent: 32 random bytes as 64 hex
    digits, mode 0600, in a folder created with mode 0700. Any file of at least 16 bytes (surrounding
    whitespace ignored) is a secret; its bytes are the HMAC key."""
    path = Path(path).expanduser()
    if not path.exists():
        _create_secret(path)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"privacy.secret_file={path}: cannot be read ({exc.strerror})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"privacy.secret_file={path}: holds {len(secret)} bytes, fewer than {MIN_SECRET_BYTES}; delete it "
            "to have a new random one made (new pseudonyms), or put a longer secret in it"
        )
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("privacy.secret_file=%s can be read by other users: chmod 600 it", path)
    return secret


def _create_secret(path: Path) -> None:
    """Write a new random secret to ``path`` without ever replacing one that another process wrote first
    (a finished temporary file is hard-linked into place, which fails when ``path`` exists)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".secret.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            log.info("privacy: made a new pseudonym secret in %s (keep it to keep the pseudonyms)", path)
        except FileExistsError:
            pass  # another run made one first: that one is used
    finally:
        Path(tmp).unlink(missing_ok=True)


class Pseudonymizer:
    """``pseudonym(patient_id)``: ``pt-<hex>`` with a secret, the id unchanged without one.

    Args:
        secret: the HMAC-SHA256 key; None = pseudonymisation off (ids pass through).
        length: hex digits kept (6 to 64; 10 = 40 bits, collisions unlikely below ~100k patients).
        online: the W&B run it serves is online (for the identifier-shape warning).
        mapping_file: where :meth:`prepare` writes (patient, pseudonym) rows; None = nowhere.
    """

    def __init__(
        self, secret: bytes | None, length: int = 10, online: bool = False, mapping_file: str | Path | None = None
    ) -> None:
        if not 6 <= length <= 64:
            raise ConfigError(f"privacy.pseudonym_length must be between 6 and 64, got {length}")
        self._secret, self.length, self.online = secret, length, online
        self.mapping_file = Path(mapping_file) if mapping_file else None
        self._prepared = False

    @property
    def active(self) -> bool:
        return self._secret is not None

    def __call__(self, patient_id: str) -> str:
        if self._secret is None:
            return patient_id
        digest = hmac.new(self._secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return PREFIX + digest[: self.length]

    def __repr__(self) -> str:  # never the secret
        return f"Pseudonymizer(active={self.active}, length={self.length}, online={self.online})"

    def prepare(self, patient_ids: Sequence[str]) -> None:
        """Once per run, with every patient id of the data: refuse colliding pseudonyms, write the mapping
        file (when asked for), and warn when online W&B would receive identifier-shaped folder names."""
        if self._prepared:
            return
        self._prepared = True
        if not self.active:
            if self.online:
                warn_identifier_shapes(patient_ids)
            return
        pseudonyms = {pid: self(pid) for pid in patient_ids}
        twice = [p for p, n in Counter(pseudonyms.values()).items() if n > 1]
        if twice:
            raise ConfigError(
                f"privacy.pseudonym_length={self.length}: {len(twice)} pseudonym(s) shared by two patients; "
                "use a longer one"
            )
        if self.mapping_file is not None:
            rows = sorted(pseudonyms.items())
            atomic_write_csv(self.mapping_file, ["patient", "pseudonym"], rows)
            log.info("privacy: %d pseudonyms mapped back in %s (keep it local)", len(rows), self.mapping_file)


#: an inactive pseudonymizer: what a logger without one gets
IDENTITY = Pseudonymizer(None)


def warn_identifier_shapes(patient_ids: Sequence[str]) -> bool:
    """Warn (without naming any patient) when some of ``patient_ids`` look like identifiers; True if so."""
    found = identifier_shapes(patient_ids)
    if not found:
        return False
    kinds = Counter(why for _, why in found)
    log.warning(
        "W&B logs online without pseudonyms, and %d of %d patient folder names look like identifiers (%s): "
        "they are uploaded in W&B tables, image captions and the run report. "
        "Set privacy.pseudonymize=true (or auto) to upload keyed pseudonyms instead.",
        len(found),
        len(patient_ids),
        "; ".join(f"{n} {why}" for why, n in kinds.items()),
    )
    return True


def carried(logger: Any) -> Pseudonymizer | None:
    """The :class:`Pseudonymizer` a logger carries (:func:`instantiate_logger`), or None. Lightning's
    ``DummyLogger`` (``trainer.fast_dev_run``) answers any attribute with a no-op function: not one."""
    found = getattr(logger, ATTRIBUTE, None)
    return found if isinstance(found, Pseudonymizer) else None


def pseudonymizer_of(logger: Any) -> Pseudonymizer:
    """The :class:`Pseudonymizer` a logger carries (:func:`instantiate_logger`); inactive if none."""
    return carried(logger) or IDENTITY


def prepare_loggers(loggers: Iterable[Any], patient_ids: Sequence[str] | None) -> None:
    """:meth:`Pseudonymizer.prepare` of every logger's pseudonymizer (idempotent)."""
    if patient_ids is None:
        return
    for logger in loggers:
        pseudonymizer = carried(logger)
        if pseudonymizer is not None:
            pseudonymizer.prepare(list(patient_ids))


def wandb_pseudonymizer(privacy: Any, logger_conf: Any, output_dir: str | Path | None) -> Pseudonymizer:
    """The :class:`Pseudonymizer` of a WandbLogger configured by ``logger_conf``, from the ``privacy``
    config block (``pseudonymize``, ``secret_file``, ``mapping_file``, ``pseudonym_length``)."""
    online = not logger_conf.get("offline", False)
    if not pseudonymizing(privacy.pseudonymize, online):
        return Pseudonymizer(None, privacy.pseudonym_length, online)
    if logger_conf.get("log_model"):
        raise ConfigError(
            "logger.wandb.log_model uploads checkpoints, which hold the split's patient ids (folder names) "
            "unpseudonymized: set logger.wandb.log_model=false, or privacy.pseudonymize=false"
        )
    mapping = Path(output_dir) / PSEUDONYMS_FILE if privacy.mapping_file and output_dir else None
    return Pseudonymizer(load_secret(privacy.secret_file), privacy.pseudonym_length, online, mapping)


def instantiate_logger(conf: Any, cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(conf, **kwargs)`` of a logger; a WandbLogger carries its
    :class:`Pseudonymizer` (from ``cfg.privacy``), and when that is active, W&B's console capture is off
    (log lines and warnings name patients; the run's own train.log keeps them, locally).

    A WandbLogger gets plain dicts and lists (``_convert_="all"``): ``wandb.init`` ignores a ``settings``
    that is neither a dict nor a ``wandb.Settings``, such as the DictConfig Hydra would pass."""
    if not str(conf.get("_target_", "")).endswith("WandbLogger"):
        return instantiate(conf, **kwargs)
    pseudonymizer = wandb_pseudonymizer(cfg.privacy, conf, cfg.paths.get("output_dir"))
    if pseudonymizer.active:
        settings = dict(kwargs.get("settings") or conf.get("settings") or {})
        kwargs["settings"] = settings | {"console": "off"}
        secret = Path(cfg.privacy.secret_file).expanduser()
        log.info("privacy: W&B gets patient pseudonyms (key: %s) and no console capture", secret)
    logger = instantiate(conf, _convert_="all", **kwargs)
    setattr(logger, ATTRIBUTE, pseudonymizer)
    # Lightning always passes anonymous=None to wandb.init, which wandb >= 0.19 answers with a warning per run
    if getattr(logger, "_wandb_init", {}).get("anonymous", ...) is None:
        logger._wandb_init.pop("anonymous")
    return logger

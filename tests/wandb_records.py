"""Read the records of an offline W&B run's ``run-*.wandb`` file (what ``wandb sync`` uploads), for tests.

W&B 0.31 ships no Python reader for it. The file is a LevelDB-style log: a 7-byte header (``:W&B``,
magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each ``<crc32 uint32, length uint16, type uint8>``
then its bytes (type 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a chunk header is
padding. Each reassembled record is a ``wandb_internal_pb2.Record`` protobuf."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
CHUNK_HEADER = struct.Struct("<IHB")
FILE_HEADER = struct.Struct("<4sHB")


def records(path: Path) -> list[Any]:
    """Every ``Record`` in the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _version = FILE_HEADER.unpack_from(data)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B transaction log"
    out, pending, pos = [], b"", FILE_HEADER.size
    while pos + CHUNK_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER.size:  # block padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        pos += CHUNK_HEADER.size
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _latest(path: Path, kind: str) -> dict[str, Any]:
    """Every ``kind`` (``summary`` or ``config``) record's update items: key -> its latest value (JSON-decoded),
    less the keys a later record removed. A media value's fields are ``<key>/<field>`` (W&B's own summary
    updates them one by one); a later update of the whole ``<key>`` replaces them."""
    values: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == kind:
            for item in getattr(record, kind).update:
                key = item.key or "/".join(item.nested_key)
                if item.key:
                    values = {k: v for k, v in values.items() if not k.startswith(key + "/")}
                values[key] = json.loads(item.value_json)
            for item in getattr(record, kind).remove:
                values.pop(item.key or "/".join(item.nested_key), None)
    return values


def summary(path: Path) -> dict[str, Any]:
    """The run's final summary."""
    return _latest(path, "summary")


def config(path: Path) -> dict[str, Any]:
    """The run's config."""
    return _latest(path, "config")


def run_name(path: Path) -> str:
    """The run's display name."""
    return next(r.run.display_name for r in records(path) if r.WhichOneof("record_type") == "run")


def run_tags(path: Path) -> list[str]:
    """The run's tags."""
    return next(list(r.run.tags) for r in records(path) if r.WhichOneof("record_type") == "run")


def chart_sections(path: Path, media: bool = False) -> dict[str, list[str]]:
    """The panels W&B's automatic workspace makes of the run: section -> its panels' keys (sorted).

    One line chart per scalar history key (a number) that is not hidden (``define_metric(..., hidden=True)``,
    by name or by a ``prefix*`` glob) nor internal (``_step``, ``_runtime``, ...); with ``media``, one panel
    per media key too (a table, images: a nested history value, ``{"_type": ...}``). A key's section is its
    prefix before the first ``/``; a key without one goes to ``Charts``."""
    hidden_names, hidden_globs, keys = set(), [], set()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "metric" and record.metric.options.hidden:
            if record.metric.glob_name:
                hidden_globs.append(record.metric.glob_name.removesuffix("*"))
            else:
                hidden_names.add(record.metric.name)
        elif kind == "history":
            for item in record.history.item:
                if len(item.nested_key) > 1:  # a field of a media value: its panel is the value's
                    keys.update([item.nested_key[0]] if media else [])
                    continue
                key = item.key or item.nested_key[0]
                value = json.loads(item.value_json)
                if not key.startswith("_") and isinstance(value, int | float) and not isinstance(value, bool):
                    keys.add(key)
    sections: dict[str, list[str]] = {}
    for key in sorted(keys):
        if key not in hidden_names and not any(key.startswith(g) for g in hidden_globs):
            sections.setdefault(key.split("/", 1)[0] if "/" in key else "Charts", []).append(key)
    return sections


def history(path: Path) -> list[dict[str, Any]]:
    """Every history row (one ``log`` call): its scalar and text items, key -> value (media fields left out)."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = [i for i in record.history.item if len(i.nested_key) < 2]
            rows.append({item.key or item.nested_key[0]: json.loads(item.value_json) for item in items})
    return rows

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
    """Every ``kind`` (``summary`` or ``config``) record's update items: key -> its latest value (JSON-decoded)."""
    values: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == kind:
            for item in getattr(record, kind).update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
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

"""Read the records of an offline W&B run file (``run-*.wandb``) without the network or the W&B service.

The file is a LevelDB-style log (wandb's datastore): a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB
blocks of chunks, each chunk = CRC32 (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last) + data;
a record (a protobuf ``Record``) is one full chunk or a first..last run of chunks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, CHUNK_HEADER, FILE_HEADER = 32768, 7, 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = FILE_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: Path) -> list[dict]:
    """Every ``wandb.log`` row: {key: value}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def config(path: Path) -> dict:
    out = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out

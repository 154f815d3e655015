"""Key files: the (index, id, key) table of a keyed training set with the
SolidMark parameters, as Parquet or JSON."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .keys import SolidMark, _check_keys


@dataclass
class KeyTable:
    """Keys of a keyed training set: one row per sample.

    Attributes:
        index: [N] int64 positions in the dataset.
        ids: N sample ids (ints, strings or bytes).
        keys: [N] float64 keys in [0, 1].
        thickness, seed, value_range: the SolidMark that produced them.
    """

    index: np.ndarray
    ids: list
    keys: np.ndarray
    thickness: int
    seed: int
    value_range: tuple[float, float]

    def solidmark(self) -> SolidMark:
        return SolidMark(self.thickness, self.seed, self.value_range)

    def __len__(self):
        return len(self.ids)


def save_keys(path, ids: Sequence, keys, solidmark: SolidMark, *, index=None) -> None:
    """Write a key table: Parquet (``.parquet`` / ``.pq``, via pyarrow, the
    SolidMark parameters in the schema metadata) or JSON (``.json``).
    Columns: index (int64), id, key (float64). Parquet needs ids of one kind."""
    ids = list(ids)
    k = _check_keys(keys).reshape(-1)
    if len(ids) != k.shape[0]:
        raise ValueError(f"got {len(ids)} ids and {k.shape[0]} keys")
    idx = np.arange(len(ids), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    if idx.shape != k.shape:
        raise ValueError(f"index must have one entry per key, got shape {idx.shape}")
    ids = [int(i) if not isinstance(i, (str, bytes, bytearray)) else i for i in ids]
    meta = {"format": "mmh_fast.solidmark.keys", "version": 1, "thickness": solidmark.thickness,
            "seed": solidmark.seed, "value_range": list(solidmark.value_range)}
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        kinds = {type(i) for i in ids}
        if len(kinds) > 1:
            raise ValueError(f"Parquet key files need ids of one kind, got {sorted(t.__name__ for t in kinds)}")
        table = pa.table({"index": pa.array(idx, pa.int64()), "id": pa.array(ids), "key": pa.array(k, pa.float64())})
        table = table.replace_schema_metadata({b"solidmark": json.dumps(meta).encode()})
        pq.write_table(table, path)
    elif ext == ".json":
        if any(isinstance(i, (bytes, bytearray)) for i in ids):
            raise ValueError("JSON key files cannot hold bytes ids; use Parquet")
        # json writes floats with repr(), so keys round-trip exactly
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**meta, "index": idx.tolist(), "id": ids, "key": k.tolist()}, f)
    else:
        raise ValueError(f"path must end in .parquet, .pq or .json, got {path!r}")


def load_keys(path) -> KeyTable:
    """Read a key table written by :func:`save_keys` (Parquet or JSON)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"solidmark")
        if raw is None:
            raise ValueError(f"{path} is not a SolidMark key file (no 'solidmark' schema metadata)")
        meta = json.loads(raw)
        index = np.asarray(table.column("index").to_numpy(), dtype=np.int64)
        ids = table.column("id").to_pylist()
        keys = np.asarray(table.column("key").to_numpy(), dtype=np.float64)
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != "mmh_fast.solidmark.keys":
            raise ValueError(f"{path} is not a SolidMark key file")
        index = np.asarray(meta["index"], dtype=np.int64)
        ids = list(meta["id"])
        keys = np.asarray(meta["key"], dtype=np.float64)
    else:
        raise ValueError(f"path must end in .parquet, .pq or .json, got {path!r}")
    return KeyTable(index, ids, keys, int(meta["thickness"]), int(meta["seed"]), tuple(meta["value_range"]))

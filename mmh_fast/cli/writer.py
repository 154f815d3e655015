"""Result storage of ``mmh-fast scan``: Parquet parts written atomically, resume
state, and the merge into one ``results.parquet``.

Layout of an output directory::

    scan.json                       what was scanned and how (checked on resume)
    part-u0000012-s0003.parquet     rows of unit 12, the 4th part written for it
    results.parquet                 the merge: every sample exactly once, in source order

Guarantees. A part is written to a temporary name, flushed to disk and renamed
(``os.replace``), so a part file is either complete or absent; a process killed
at any moment loses at most the rows it had not yet written. Rows are identified
by (unit, position in unit); a resumed scan skips the positions already in parts
and a unit whose last part carries ``complete`` is skipped whole. The merge
sorts by (unit, position) and keeps one row per identity, so a sample appears
exactly once even if two parts ever held it.

One row per sample: ``key``, ``source`` (where the image was read), ``caption``,
``width``/``height`` (the original image size), one column per metric, and
``error`` (null when every step succeeded). The scan's settings, the model and
the metrics' orientation are stored as JSON under the ``mmh_fast`` key of each
file's Parquet metadata.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

__all__ = ["MANIFEST", "RESULTS", "META_KEY", "ResumeState", "PartWriter", "read_resume_state", "merge",
           "part_files", "table_metadata", "result_schema", "write_table_atomic", "read_manifest",
           "write_json_atomic", "settings_diff", "describe_errors", "read_output"]

MANIFEST = "scan.json"
RESULTS = "results.parquet"
META_KEY = b"mmh_fast"
_PART_RE = re.compile(r"^part-u(\d+)-s(\d+)\.parquet$")
_BASE_COLUMNS = ("key", "source", "caption", "width", "height")


def result_schema(metric_dtypes: dict[str, str], *, internal: bool = True) -> pa.Schema:
    fields = [pa.field("key", pa.string()), pa.field("source", pa.string()), pa.field("caption", pa.string()),
              pa.field("width", pa.int32()), pa.field("height", pa.int32())]
    for name, dt in metric_dtypes.items():
        fields.append(pa.field(name, {"int64": pa.int64(), "bool": pa.bool_()}.get(dt, pa.float64())))
    fields.append(pa.field("error", pa.string()))
    if internal:
        fields += [pa.field("_unit", pa.int64()), pa.field("_pos", pa.int64())]
    return pa.schema(fields)


def table_metadata(path: str) -> dict:
    """The ``mmh_fast`` JSON metadata of a Parquet file ({} when absent)."""
    md = pq.read_schema(path).metadata or {}
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else {}


def read_output(path: str, *, default_name: str, what: str, missing_hint: str = ""):
    """(path, table, ``mmh_fast`` metadata dict) of a command's Parquet output:
    ``path`` itself, or ``default_name`` inside it when it is a directory.
    Errors are :class:`UserError` naming ``what`` (the argument) and the path."""
    if os.path.isdir(path):
        path = os.path.join(path, default_name)
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist{missing_hint}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's own error types
        raise UserError(f"{what} {path!r} is not a readable Parquet file: {exc}") from None
    return path, table, json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_table_atomic(table: pa.Table, path: str) -> None:
    """Write ``table`` to ``path`` through a temporary file and ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(d)


def write_json_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def settings_diff(old: dict, new: dict, prefix: str = "") -> str:
    """The entries that differ between two settings dicts, as ``name: was A, now B``
    joined by "; " (nested dicts by dotted names); "" when they are equal."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = settings_diff(a, b, f"{prefix}{key}.")
            if sub:
                out.append(sub)
        elif a != b:
            out.append(f"{prefix}{key}: was {json.dumps(a, sort_keys=True, default=str)}, "
                       f"now {json.dumps(b, sort_keys=True, default=str)}")
    return "; ".join(out)


_ERROR_EXAMPLES = 3


def describe_errors(summary: dict) -> str:
    """"": no errors; else ": KEY (error), ... and N more; all in the error column of PATH"."""
    ex = summary.get("error_examples") or []
    if not summary.get("errors") or not ex:
        return ""
    shown = ", ".join(f"{k} ({e if len(e) <= 80 else e[:77] + '...'})" for k, e in ex)
    more = f" and {summary['errors'] - len(ex)} more" if summary["errors"] > len(ex) else ""
    return f"\n  failed: {shown}{more}; every failed sample has its reason in the 'error' column of {summary['path']}"


def read_manifest(out_dir: str, *, name: str = MANIFEST) -> dict | None:
    """The JSON manifest ``name`` of an output directory (None when absent)."""
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def part_files(out_dir: str) -> list[tuple[int, int, str]]:
    """(unit, seq, path) of every finished part, sorted."""
    out = []
    for path in glob.glob(os.path.join(out_dir, "part-u*-s*.parquet")):
        m = _PART_RE.match(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return sorted(out)


@dataclass
class ResumeState:
    """What the parts in a directory already hold."""

    complete_units: set = field(default_factory=set)
    done_positions: dict = field(default_factory=dict)  # unit -> set of positions (incomplete units)
    next_seq: dict = field(default_factory=dict)  # unit -> next part number
    rows: int = 0

    def rows_in(self, unit: int) -> int:
        return len(self.done_positions.get(unit, ()))


def read_resume_state(out_dir: str, units=None) -> ResumeState:
    """Scan the parts of ``out_dir`` (restricted to ``units`` when given)."""
    state = ResumeState()
    by_unit: dict[int, list] = {}
    for unit, seq, path in part_files(out_dir):
        if units is not None and unit not in units:
            continue
        by_unit.setdefault(unit, []).append((seq, path))
    for unit, parts in by_unit.items():
        state.next_seq[unit] = max(s for s, _ in parts) + 1
        complete = False
        for _, path in parts:
            try:
                meta = table_metadata(path).get("part", {})
                state.rows += pq.read_metadata(path).num_rows
            except Exception as exc:  # an unreadable part cannot come from us: tell the user
                raise UserError(f"part file {path} is unreadable ({exc}); move it away to rescan its rows") from None
            complete = complete or bool(meta.get("complete"))
        if complete:
            state.complete_units.add(unit)
        else:
            pos = set()
            for _, path in parts:
                pos.update(pq.read_table(path, columns=["_pos"]).column("_pos").to_pylist())
            state.done_positions[unit] = pos
    return state


class PartWriter:
    """Buffers rows per unit and writes them as atomic Parquet parts.

    A unit's buffer is written when it reaches ``part_rows`` rows, when it has
    waited ``flush_seconds``, when the unit ends (that part is marked
    ``complete``) and on :meth:`close` (interrupted: not complete)."""

    def __init__(self, out_dir: str, metric_dtypes: dict[str, str], metadata: dict, *,
                 next_seq: dict | None = None, part_rows: int = 1024, flush_seconds: float = 300.0,
                 rank: int = 0, world_size: int = 1):
        self.out_dir = out_dir
        self.rank, self.world_size = rank, world_size
        self.schema = result_schema(metric_dtypes)
        self.metrics = list(metric_dtypes)
        self.metadata = metadata
        self.next_seq = dict(next_seq or {})
        self.part_rows = max(1, int(part_rows))
        self.flush_seconds = flush_seconds
        self._buf: dict[int, dict[str, list]] = {}
        self._since: dict[int, float] = {}
        self.rows_written = 0
        self.parts_written = 0

    def add(self, unit: int, rows: dict[str, list]) -> None:
        """Append rows (a dict of equally long column lists, schema columns except _unit)."""
        buf = self._buf.get(unit)
        if buf is None:
            buf = self._buf[unit] = {name: [] for name in self.schema.names}
            self._since[unit] = time.monotonic()
        n = len(rows["key"])
        for name in self.schema.names:
            if name == "_unit":
                buf[name].extend([unit] * n)
            else:
                buf[name].extend(rows[name])
        if len(buf["key"]) >= self.part_rows or time.monotonic() - self._since[unit] >= self.flush_seconds:
            self.flush(unit, complete=False)

    def unit_done(self, unit: int) -> None:
        self.flush(unit, complete=True, force=True)

    def flush(self, unit: int, *, complete: bool, force: bool = False) -> None:
        buf = self._buf.pop(unit, None)
        self._since.pop(unit, None)
        n = 0 if buf is None else len(buf["key"])
        if n == 0 and not force:
            return
        if buf is None:
            buf = {name: [] for name in self.schema.names}
        seq = self.next_seq.get(unit, 0)
        self.next_seq[unit] = seq + 1
        meta = dict(self.metadata)
        meta["part"] = {"unit": unit, "seq": seq, "complete": complete, "rows": n, "rank": self.rank,
                        "world_size": self.world_size}
        table = pa.table({name: pa.array(buf[name], type=self.schema.field(name).type)
                          for name in self.schema.names},
                         schema=self.schema.with_metadata({META_KEY: json.dumps(meta).encode()}))
        write_table_atomic(table, os.path.join(self.out_dir, f"part-u{unit:07d}-s{seq:04d}.parquet"))
        self.rows_written += n
        self.parts_written += 1

    def close(self) -> None:
        """Write every unfinished buffer (the scan stops before those units end)."""
        for unit in list(self._buf):
            self.flush(unit, complete=False)


def merge(out_dir: str) -> dict:
    """Merge the parts of ``out_dir`` into ``results.parquet`` (atomically).

    Returns a summary: rows, errors, duplicates dropped, units complete/total,
    whether the scan is complete, the path, and ``notes`` worth telling the user."""
    if not os.path.isdir(out_dir):
        raise UserError(f"{out_dir!r} is not a directory")
    parts = part_files(out_dir)
    manifest = read_manifest(out_dir)
    if not parts:
        raise UserError(f"{out_dir!r} holds no result parts (part-*.parquet); nothing to merge")
    tables, complete_units = [], set()
    meta = None
    for unit, _, path in parts:
        t = pq.read_table(path)
        m = json.loads((t.schema.metadata or {}).get(META_KEY, b"{}"))
        if m.get("part", {}).get("complete"):
            complete_units.add(unit)
        if meta is None:
            meta = m
        tables.append(t.replace_schema_metadata(None))
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise UserError(f"the parts in {out_dir!r} have different columns (scans with different "
                        f"metrics in one directory?): {exc}") from None
    order = np.lexsort((table.column("_pos").to_numpy(), table.column("_unit").to_numpy()))
    table = table.take(pa.array(order))
    u = table.column("_unit").to_numpy()
    p = table.column("_pos").to_numpy()
    keep = np.ones(len(u), dtype=bool)
    if len(u) > 1:
        keep[1:] = (u[1:] != u[:-1]) | (p[1:] != p[:-1])
    dropped = int((~keep).sum())
    if dropped:
        table = table.filter(pa.array(keep))
    table = table.drop_columns(["_unit", "_pos"])
    keys = table.column("key").to_pylist()
    dup_keys = len(keys) - len(set(keys))
    total_units = manifest.get("units") if manifest else None
    err_col = table.column("error")
    failed = np.nonzero(~np.asarray(err_col.is_null().to_numpy(zero_copy_only=False)))[0][:_ERROR_EXAMPLES]
    examples = [[table.column("key")[int(i)].as_py(), err_col[int(i)].as_py()] for i in failed]
    summary = {"rows": table.num_rows, "errors": table.num_rows - err_col.null_count, "error_examples": examples,
               "duplicates_dropped": dropped, "duplicate_keys": dup_keys,
               "units_complete": len(complete_units), "units_total": total_units,
               "complete": total_units is not None and len(complete_units) >= total_units,
               "path": os.path.join(out_dir, RESULTS)}
    meta = dict(meta or {})
    meta.pop("part", None)
    if manifest:
        for k in ("model", "settings", "source", "metrics", "version"):
            if k in manifest:
                meta[k] = manifest[k]
    meta["merge"] = {k: v for k, v in summary.items() if k != "path"}
    summary["notes"] = []
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    write_table_atomic(table, summary["path"])
    for tmp in glob.glob(os.path.join(out_dir, ".part-*.tmp.*")):
        # Leftovers of killed writers; a live writer's temp file would be a
        # concurrent scan in the same directory, which is not supported.
        try:
            os.unlink(tmp)
        except OSError:
            pass
    notes = []
    if dropped:
        notes.append(f"{dropped} rows were present twice in the parts of {out_dir}; kept one of each")
    if dup_keys:
        notes.append(f"the source has {dup_keys} duplicated keys; their rows differ by 'source'")
    summary["notes"] = notes
    return summary

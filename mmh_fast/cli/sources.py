"""Data sources for ``mmh-fast scan`` and ``lid-data``: where images and captions come from.

Three kinds, chosen from the SOURCE argument:

* a folder of images (searched recursively); a caption is read from a ``.txt``
  file with the same stem beside the image when there is one;
* WebDataset tar shards in the img2dataset layout (``KEY.jpg|png|webp`` with
  ``KEY.txt`` and ``KEY.json`` beside it), given as one ``.tar`` file, a brace
  pattern such as ``shards/{00000..00099}.tar``, a glob, or a folder that holds
  only ``.tar`` files;
* a Parquet or CSV table with an image column (a path, relative to the table's
  folder unless absolute, or the encoded image bytes, or a
  ``{"bytes": ..., "path": ...}`` struct as Hugging Face datasets write it) and
  an optional caption and key column.

Keys. Every command (``scan``, ``lid-data``, ``classify``, ``report``) keys a
sample by these rules, so their outputs join on ``key``:

* folder: the path relative to the folder, with its extension,
  ``/``-separated (``cats/001.jpg``);
* WebDataset shards: the WebDataset key, the member's path up to the first
  dot of its basename (``000123`` for ``000123.jpg``);
* tables: the key column (``--key-column``, else ``key``, ``id`` or
  ``image_id``; it must be unique), else the row number as a string.

Work is cut into *units* (one shard, or ``unit_size`` consecutive files/rows),
the granule of distribution across torchrun ranks and of resumption: a
sample's identity is (unit, position in unit), with the user-facing key beside
it. Units are plain picklable records so that DataLoader workers can read them.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "RawSample", "Unit", "Source", "open_source", "expand_braces",
           "decode_image", "read_image_at", "sample_id"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "image_bytes", "bytes", "image_path", "path",
                  "filepath", "file", "filename")
_CAPTION_COLUMNS = ("caption", "text", "prompt", "txt", "title")
_KEY_COLUMNS = ("key", "id", "image_id")
LOCATION_SEP = "::"


@dataclass
class RawSample:
    """One sample before decoding. ``data`` is encoded bytes or a file path."""

    position: int
    key: str
    location: str
    caption: str | None
    data: bytes | str | None
    error: str | None = None


@dataclass
class Unit:
    """A contiguous piece of a source: a shard or a slice of files/rows."""

    index: int
    kind: str
    path: str  # shard or table path; the folder root for folders
    start: int = 0
    stop: int | None = None  # exclusive; None = to the end (shards)
    files: list = field(default_factory=list)  # folders: (relative path, caption path or None)
    size: int | None = None  # number of samples when known


def sample_id(key: str) -> int:
    """A 63-bit integer derived from a key: the per-sample seed of randomized metrics,
    so a sample's probes do not depend on the batch or rank it falls in."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..099}`` ranges (zero padding kept), left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        items = [str(i).zfill(width) for i in range(a, b + step, step)]
    else:
        items = body.split(",")
    out = []
    for item in items:
        out.extend(expand_braces(head + item + tail))
    return out


class Source:
    """A data source cut into units. ``units`` are in source order; ``num_samples``
    is None when it is unknown without reading every shard."""

    kind = "?"

    def __init__(self, spec: str):
        self.spec = spec
        self.units: list[Unit] = []
        self.num_samples: int | None = None

    def iter_unit(self, unit: Unit) -> Iterator[RawSample]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of what identifies the samples (names, sizes), to detect a source
        that changed between a scan and its resumption."""
        raise NotImplementedError

    def describe(self) -> str:
        n = "?" if self.num_samples is None else str(self.num_samples)
        return f"{self.kind} {self.spec} ({n} samples in {len(self.units)} units)"


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace").strip()


# --------------------------------------------------------------------------- folder
class FolderSource(Source):
    kind = "folder"

    def __init__(self, root: str, *, unit_size: int, limit: int | None):
        super().__init__(root)
        self.root = os.path.abspath(root)
        images, texts = [], set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames.sort()
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                ext = os.path.splitext(name)[1].lower()
                if ext in IMAGE_EXTENSIONS:
                    images.append(rel)
                elif ext == ".txt":
                    texts.add(rel)
        images.sort()
        if limit is not None:
            images = images[:limit]
        files = []
        for rel in images:
            txt = os.path.splitext(rel)[0] + ".txt"
            files.append((rel, txt if txt in texts else None))
        self.num_samples = len(files)
        self._fp = _digest([self.root] + images)
        for i, start in enumerate(range(0, len(files), unit_size)):
            chunk = files[start:start + unit_size]
            self.units.append(Unit(i, self.kind, self.root, start, start + len(chunk), chunk, len(chunk)))

    def iter_unit(self, unit):
        for pos, (rel, txt) in enumerate(unit.files):
            path = os.path.join(unit.path, rel)
            caption, error = None, None
            if txt is not None:
                try:
                    caption = _read_text(os.path.join(unit.path, txt))
                except OSError as exc:
                    error = f"caption: {exc}"
            yield RawSample(pos, rel, path, caption, path, error)

    def fingerprint(self):
        return self._fp


# --------------------------------------------------------------------------- tar shards
def _tar_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _tar_samples(path: str) -> Iterator[tuple[str, dict]]:
    """(key, {extension: (member name, bytes)}) for each run of consecutive members
    sharing a key."""
    cur, files = None, {}
    with tarfile.open(path, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, ext = _tar_key(member.name)
            if key != cur:
                if cur is not None:
                    yield cur, files
                cur, files = key, {}
            f = tf.extractfile(member)
            files[ext] = (member.name, f.read() if f is not None else b"")
    if cur is not None:
        yield cur, files


_TAR_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def _count_tar_samples(path: str) -> int:
    n, cur = 0, None
    with tarfile.open(path, mode="r:*") as tf:
        for member in tf.getmembers():
            if member.isfile():
                key, _ = _tar_key(member.name)
                if key != cur:
                    n, cur = n + 1, key
    return n


class TarSource(Source):
    kind = "webdataset"

    def __init__(self, spec: str, shards: list[str], *, limit: int | None):
        super().__init__(spec)
        shards = [os.path.abspath(s) for s in shards]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"data source {spec!r}: shard {missing[0]} does not exist{more}")
        sizes = []
        if limit is not None:
            # The first `limit` samples in shard order: count members shard by shard.
            left = limit
            for s in shards:
                if left <= 0:
                    break
                n = _count_tar_samples(s)
                sizes.append(min(n, left))
                left -= sizes[-1]
            shards = shards[:len(sizes)]
            self.num_samples = sum(sizes)
        self.units = [Unit(i, self.kind, s, 0, sizes[i] if sizes else None, size=sizes[i] if sizes else None)
                      for i, s in enumerate(shards)]
        self._fp = _digest([limit] + [f"{s}:{os.path.getsize(s)}" for s in shards])

    def iter_unit(self, unit):
        pos = 0
        try:
            for key, files in _tar_samples(unit.path):
                if unit.stop is not None and pos >= unit.stop:
                    return
                ext = next((e for e in _TAR_IMAGE_EXTS if e in files), None)
                caption = None
                if "txt" in files:
                    caption = files["txt"][1].decode("utf-8", "replace").strip()
                elif "json" in files:
                    caption = _json_caption(files["json"][1])
                if ext is None:
                    yield RawSample(pos, key, f"{unit.path}{LOCATION_SEP}{key}", caption, None,
                                    f"no image member (found: {', '.join(sorted(files)) or 'nothing'})")
                else:
                    name, data = files[ext]
                    yield RawSample(pos, key, f"{unit.path}{LOCATION_SEP}{name}", caption, data)
                pos += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            # A truncated or corrupt shard: the samples read so far stand; the
            # rest of the shard is reported as one error row at the next position.
            yield RawSample(pos, f"{os.path.basename(unit.path)}#truncated", unit.path, None, None,
                            f"unreadable shard after {pos} samples: {type(exc).__name__}: {exc}")

    def fingerprint(self):
        return self._fp


def _json_caption(raw: bytes) -> str | None:
    import json

    try:
        meta = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None
    if isinstance(meta, dict):
        for k in _CAPTION_COLUMNS:
            if isinstance(meta.get(k), str):
                return meta[k]
    return None


# --------------------------------------------------------------------------- tables
class TableSource(Source):
    kind = "table"

    def __init__(self, path: str, *, unit_size: int, limit: int | None, image_column=None,
                 caption_column=None, key_column=None, require_image: bool = True):
        super().__init__(path)
        self.path = os.path.abspath(path)
        self.is_parquet = self.path.lower().endswith((".parquet", ".pq"))
        names = self.columns = self._column_names()
        # a table of feature vectors (lid-data --features COLUMN) may have no image column
        self.image_column = self._pick(names, image_column, _IMAGE_COLUMNS, "image", required=require_image)
        self.caption_column = self._pick(names, caption_column, _CAPTION_COLUMNS, "caption")
        self.key_column = self._pick(names, key_column, _KEY_COLUMNS, "key")
        n = self._num_rows()
        if limit is not None:
            n = min(n, limit)
        self.num_samples = n
        keys_digest = ""
        if self.key_column is not None:
            keys = self._read_columns([self.key_column], 0, n)[self.key_column]
            keys = [str(k) for k in keys]
            if len(set(keys)) != len(keys):
                dup = next(k for k, c in _counts(keys).items() if c > 1)
                raise UserError(f"data source {path!r}: key column {self.key_column!r} has duplicates "
                                f"(e.g. {dup!r}); pass --key-column with a unique column")
            keys_digest = _digest(keys)
        st = os.stat(self.path)
        self._fp = _digest([self.path, st.st_size, n, self.image_column, self.caption_column,
                            self.key_column, keys_digest])
        for i, start in enumerate(range(0, n, unit_size)):
            stop = min(n, start + unit_size)
            self.units.append(Unit(i, self.kind, self.path, start, stop, size=stop - start))

    def _column_names(self) -> list[str]:
        try:
            if self.is_parquet:
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(self.path).schema_arrow.names)
            return list(self._read_csv().column_names)
        except UserError:
            raise
        except Exception as exc:  # pyarrow raises its own error types for bad files
            raise UserError(f"data source {self.spec!r} is not a readable table: {exc}") from None

    def _read_csv(self):
        import pyarrow.csv as pcsv

        cache = getattr(self, "_csv", None)
        if cache is None:
            cache = self._csv = pcsv.read_csv(self.path)
        return cache

    def _num_rows(self) -> int:
        if self.is_parquet:
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        return self._read_csv().num_rows

    def _pick(self, names, given, candidates, what, required=False):
        if given is not None:
            if given not in names:
                raise UserError(f"data source {self.spec!r} has no column {given!r} (--{what}-column); "
                                f"columns: {', '.join(names)}")
            return given
        lower = {n.lower(): n for n in names}
        for c in candidates:
            if c in lower:
                return lower[c]
        if required:
            raise UserError(f"data source {self.spec!r}: no {what} column found among {', '.join(names)}; "
                            f"name it with --{what}-column")
        return None

    def _read_columns(self, columns, start, stop) -> dict:
        """Rows [start, stop) of the given columns as Python lists."""
        if self.is_parquet:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.path)
            md = pf.metadata
            groups, offsets, off = [], [], 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if off < stop and off + n > start:
                    groups.append(g)
                    offsets.append(off)
                off += n
            if not groups:
                return {c: [] for c in columns}
            table = pf.read_row_groups(groups, columns=columns)
            table = table.slice(start - offsets[0], stop - start)
        else:
            table = self._read_csv().select(columns).slice(start, stop - start)
        return {c: table.column(c).to_pylist() for c in columns}

    def iter_unit(self, unit):
        cols = [c for c in (self.image_column, self.caption_column, self.key_column) if c is not None]
        data = self._read_columns(list(dict.fromkeys(cols)), unit.start, unit.stop)
        base = os.path.dirname(self.path)
        for pos in range(unit.stop - unit.start):
            row = unit.start + pos
            key = str(data[self.key_column][pos]) if self.key_column else str(row)
            caption = data[self.caption_column][pos] if self.caption_column else None
            caption = None if caption is None else str(caption)
            value = data[self.image_column][pos]
            loc = f"{self.path}{LOCATION_SEP}row={row}"
            if isinstance(value, dict):  # {"bytes": ..., "path": ...}
                value = value.get("bytes") or value.get("path")
            if isinstance(value, str):
                path = value if os.path.isabs(value) else os.path.join(base, value)
                yield RawSample(pos, key, path, caption, path)
            elif isinstance(value, (bytes, bytearray)):
                yield RawSample(pos, key, loc, caption, bytes(value))
            else:
                yield RawSample(pos, key, loc, caption, None,
                                f"image column {self.image_column!r} holds {type(value).__name__}, "
                                "expected a path or bytes")

    def fingerprint(self):
        return self._fp

    def __getstate__(self):  # workers re-read the CSV rather than receive it pickled
        state = dict(self.__dict__)
        state.pop("_csv", None)
        return state


def _counts(items):
    out = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# --------------------------------------------------------------------------- opening
def open_source(spec: str, *, unit_size: int = 1024, limit: int | None = None, image_column=None,
                caption_column=None, key_column=None, require_image: bool = True) -> Source:
    """The :class:`Source` named by ``spec`` (see the module docstring for the kinds).

    ``require_image=False``: a table source needs no image column (feature tables).
    Raises :class:`UserError` when the source is missing, empty or unreadable."""
    if unit_size < 1:
        raise UserError(f"--unit-size must be at least 1, got {unit_size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    lower = spec.lower()
    if "{" in spec or lower.endswith((".tar", ".tar.gz", ".tgz")) or (
            any(ch in spec for ch in "*?[") and not os.path.exists(spec)):
        shards = []
        for pat in expand_braces(spec):
            if any(ch in pat for ch in "*?["):
                shards.extend(sorted(glob.glob(pat)))
            else:
                shards.append(pat)
        if not shards:
            raise UserError(f"data source {spec!r} matches no shard files")
        src = TarSource(spec, shards, limit=limit)
    elif os.path.isdir(spec):
        entries = os.listdir(spec)
        tars = sorted(e for e in entries if e.lower().endswith(".tar"))
        has_images = any(e.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
        if tars and not has_images:
            src = TarSource(spec, [os.path.join(spec, t) for t in tars], limit=limit)
        else:
            src = FolderSource(spec, unit_size=unit_size, limit=limit)
    elif os.path.isfile(spec):
        if not lower.endswith((".parquet", ".pq", ".csv")):
            raise UserError(f"data source {spec!r}: a file source must be .parquet, .csv or .tar")
        src = TableSource(spec, unit_size=unit_size, limit=limit, image_column=image_column,
                          caption_column=caption_column, key_column=key_column, require_image=require_image)
    else:
        raise UserError(f"data source {spec!r} does not exist")
    if not src.units or src.num_samples == 0:
        raise UserError(f"data source {spec!r} holds no images")
    return src


# --------------------------------------------------------------------------- decoding
def _open_pil(data):
    from PIL import Image

    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    img.load()  # decode now, so a truncated file fails here and not later
    return img


def decode_image(data, image_size: int | None):
    """Decode encoded bytes or a path to ``(uint8 array [3, H, W], width, height)``.

    With ``image_size`` the image is resized (shorter side, bicubic) and
    centre-cropped to a square of that side, as diffusion training pipelines do;
    ``width``/``height`` are always those of the original image."""
    from PIL import Image

    img = _open_pil(data)
    width, height = img.size
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P") and ("transparency" in img.info or img.mode != "P"):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            img = img.convert("RGB")
    if image_size is not None and (width, height) != (image_size, image_size):
        s = image_size / min(width, height)
        w, h = max(image_size, round(width * s)), max(image_size, round(height * s))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    return arr, width, height


def read_image_at(location: str, *, image_column: str | None = None):
    """Open the image a result row points to (its ``source`` value) as a PIL image:
    a file path, ``shard.tar::KEY.ext`` or ``table.parquet::row=N``."""
    if LOCATION_SEP not in location:
        return _open_pil(location)
    container, _, inner = location.rpartition(LOCATION_SEP)
    if inner.startswith("row="):
        src = TableSource(container, unit_size=1 << 30, limit=None, image_column=image_column)
        row = int(inner[4:])
        value = src._read_columns([src.image_column], row, row + 1)[src.image_column][0]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and not os.path.isabs(value):
            value = os.path.join(os.path.dirname(container), value)
        return _open_pil(value)
    with tarfile.open(container, mode="r:*") as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name == inner:
                return _open_pil(tf.extractfile(member).read())
    raise FileNotFoundError(f"{inner} not in {container}")

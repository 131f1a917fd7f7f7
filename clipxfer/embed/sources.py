"""Where images come from: a folder, webdataset tar shards, parquet files, a saved HF dataset.

A source is split into :class:`Unit` s, the grain of work and of output: one tar shard, one
parquet file, a run of ``shard_size`` rows (HF dataset), or a run of ``shard_size`` files not yet
embedded (folder). Each unit becomes one embedding shard, so a re-run skips the units whose shard
is written; a folder's units are its files not yet in a shard by path and content (size, then
SHA-256), so files added or changed since are embedded and nothing twice. Reading a unit gives
``(key, payload)`` items: the key is stable (``path`` relative to the folder, ``shard/key`` for
tars, the ``key`` column or ``file/row`` for parquet, the row number for HF datasets) and the
payload is the image's bytes, a local file path, or None when the item has no image. Keys are
names, never paths to open: one that would leave the source (absolute, ``..``) is a failure.

Reading uses the ``webdataset``, ``pyarrow`` and ``datasets`` libraries; decoding is
:func:`clipxfer.encoders.pipeline.decode_bytes`, shared with the folder indexer.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..encoders.pipeline import Failure, decode_bytes, file_sha256
from ..errors import ClipxferError
from ..images import IMAGE_EXTENSIONS, find_images
from .shards import need, unsafe_key

DEFAULT_SHARD_SIZE = 10_000  # items per unit for folders and HF datasets (clip-retrieval's default)
# Columns that hold image bytes (img2dataset writes "jpg"), a path, or a key, in order of preference.
BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
PATH_COLUMNS = ("path", "image_path", "filepath", "file", "url")
KEY_COLUMNS = ("key", "__key__", "id")
TAR_IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in sorted(IMAGE_EXTENSIONS))

Item = tuple[str, "bytes | str | None"]


@dataclass(frozen=True)
class Unit:
    """One unit of work (and one output shard): ``location`` is a file, the source folder with
    ``files`` (paths relative to it), or a saved HF dataset with rows ``start:stop``."""

    kind: str  # folder | tar | parquet | hf
    name: str  # the output shard's name, stable across runs
    location: str
    start: int = 0
    stop: int = 0
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """A resolved SOURCE argument: its kind, the folder keys are relative to, and its units."""

    kind: str
    root: Path
    units: list[Unit]

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root), "units": len(self.units)}


def open_source(
    spec: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE, embedded: Callable[[], dict] | None = None
) -> Source:
    """Resolve SOURCE: a folder of images, a saved HF dataset folder, a folder of ``.tar`` or
    ``.parquet`` files, one such file, or a brace pattern ``shards/{000000..000099}.tar``.
    ``embedded`` (read for folders only): key -> (size, sha256) of the items already in shards."""
    text = str(spec)
    if "{" in text:
        braceexpand = need("braceexpand").braceexpand

        files = [Path(p) for p in braceexpand(text)]
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise ClipxferError(f"{missing[0]}: no such shard ({len(missing)} of {len(files)} in {text} are missing)")
        return _file_source(files, files[0].parent)
    path = Path(text).expanduser()
    if path.is_file():
        return _file_source([path], path.parent)
    if not path.is_dir():
        raise ClipxferError(f"{path}: not found; give a folder of images, tar or parquet shards, or a saved HF dataset")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return _hf_source(path, shard_size)
    for suffix in (".tar", ".parquet"):
        files = sorted(path.glob(f"*{suffix}"))
        if files:
            return _file_source(files, path)
    return _folder_source(path, shard_size, embedded() if embedded else {})


def _file_source(files: list[Path], root: Path) -> Source:
    kinds = {".tar": "tar", ".parquet": "parquet"}
    suffixes = {p.suffix for p in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in kinds:
        raise ClipxferError(f"{files[0]}: expected .tar (webdataset) or .parquet shards, all of one kind")
    kind = kinds[files[0].suffix]
    if kind == "parquet":  # a file without an image column is refused before any work
        pq = need("pyarrow.parquet")
        for path in files:
            try:
                schema = pq.read_schema(path)
            except Exception as exc:
                raise ClipxferError(f"{path}: unreadable parquet file ({type(exc).__name__}: {exc})".splitlines()[0]) from None
            _parquet_columns(schema, path)
    units = [Unit(kind, _unit_name(p, root), str(p.resolve())) for p in files]
    return Source(kind, root.resolve(), units)


def _unit_name(path: Path, root: Path) -> str:
    rel = path.resolve().relative_to(root.resolve()).with_suffix("")
    return rel.as_posix().replace("/", "__")


def _folder_source(root: Path, shard_size: int, done: dict) -> Source:
    if shard_size < 1:
        raise ClipxferError(f"--shard-size must be at least 1, not {shard_size}")
    files = list(find_images(root))
    if not files:
        raise ClipxferError(f"{root}: no images, tar or parquet shards found")
    todo = [path.relative_to(root).as_posix() for path in files if not _embedded(path, root, done)]
    units = []
    for start in range(0, len(todo), shard_size):
        keys = tuple(todo[start : start + shard_size])
        units.append(Unit("folder", _folder_unit_name(keys), str(root.resolve()), files=keys))
    return Source("folder", root.resolve(), units)


def _embedded(path: Path, root: Path, done: dict) -> bool:
    """Whether the file at ``path`` is in a shard already: same key and content. The size is
    compared first so that only files that may be unchanged are hashed."""
    found = done.get(path.relative_to(root).as_posix())
    if found is None:
        return False
    size, sha256 = found
    try:
        return path.stat().st_size == size and file_sha256(path) == sha256
    except OSError:
        return False  # unreadable now: embedding it again reports why


def _folder_unit_name(keys: tuple[str, ...]) -> str:
    """A name given by the unit's files, so that the same files not yet embedded (a killed
    run) get the same shard again, and new files never land on another unit's shard."""
    digest = hashlib.sha256("\0".join(keys).encode("utf-8", "surrogateescape")).hexdigest()
    return f"part-{digest[:16]}"


def _row_units(kind: str, root: Path, count: int, shard_size: int) -> list[Unit]:
    if shard_size < 1:
        raise ClipxferError(f"--shard-size must be at least 1, not {shard_size}")
    return [
        Unit(kind, f"part-{start // shard_size:06d}", str(root.resolve()), start, min(start + shard_size, count))
        for start in range(0, count, shard_size)
    ]


def _hf_source(root: Path, shard_size: int) -> Source:
    if (root / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in root.iterdir() if (p / "dataset_info.json").is_file())
        raise ClipxferError(f"{root} holds several splits ({', '.join(splits)}): give one, e.g. {root / splits[0]}")
    dataset = _load_hf(root)
    _hf_image_column(dataset, root)
    return Source("hf", root.resolve(), _row_units("hf", root, len(dataset), shard_size))


def read_unit(unit: Unit) -> list[Item | Failure]:
    """The items of one unit in a stable order; unreadable parts become :class:`Failure` s.
    Keys repeated inside a unit are reported instead of embedded twice."""
    readers = {"folder": _read_folder, "tar": _read_tar, "parquet": _read_parquet, "hf": _read_hf}
    items: list[Item | Failure] = []
    seen: set[str] = set()
    for item in readers[unit.kind](unit):
        if isinstance(item, tuple):
            reason = unsafe_key(item[0])
            if reason:
                item = Failure(item[0], f"key {reason}: keys name items inside the source, they are not paths")
            elif item[0] in seen:
                item = Failure(item[0], "repeated key (the first item with this key is kept)")
            else:
                seen.add(item[0])
        items.append(item)
    if not items:  # reported, so that every unit gives a shard and a finished job is visible
        items.append(Failure(unit.name, "no items in this unit"))
    return items


def decode_item(item: Item, size: int):
    """Decode one read item for a ``size`` px model: ``(pixels, ItemInfo)`` or a Failure.
    Runs in decode workers (a module-level function: it travels by name)."""
    key, payload = item
    if isinstance(payload, str):
        try:
            with open(payload, "rb") as handle:
                payload = handle.read()
        except OSError as exc:
            return Failure(key, f"cannot read {payload} ({exc.strerror or exc})")
    return decode_bytes(key, payload, size)


def _read_folder(unit: Unit) -> Iterator[Item]:
    root = Path(unit.location)
    for key in unit.files:
        yield key, str(root / key)


def _read_tar(unit: Unit) -> Iterator[Item | Failure]:
    """Samples of one webdataset shard: members grouped by key, the first image extension wins."""
    tariterators = need("webdataset.tariterators")
    group_by_keys, tar_file_expander, url_opener = (
        tariterators.group_by_keys, tariterators.tar_file_expander, tariterators.url_opener
    )

    shard = Path(unit.location).name
    stream = group_by_keys(tar_file_expander(url_opener([{"url": unit.location}])))
    try:
        for sample in stream:
            key = f"{shard}/{sample['__key__']}"
            image = next((sample[ext] for ext in TAR_IMAGE_EXTENSIONS if ext in sample), None)
            yield key, image
    except Exception as exc:  # a truncated or damaged tar: what was read so far is kept
        yield Failure(shard, f"tar shard damaged after the items read so far ({type(exc).__name__}: {exc})".splitlines()[0])


def _read_parquet(unit: Unit) -> Iterator[Item | Failure]:
    """Rows of one parquet file (img2dataset's layout: ``key``, ``jpg`` bytes, ``url``...)."""
    pq = need("pyarrow.parquet")

    path = Path(unit.location)
    try:
        table = pq.read_table(path)
    except Exception as exc:
        yield Failure(path.name, f"unreadable parquet file ({type(exc).__name__}: {exc})".splitlines()[0])
        return
    image_column, key_column = _parquet_columns(table.schema, path)
    keys = table.column(key_column).to_pylist() if key_column else None
    values = table.column(image_column).to_pylist()
    base = path.parent
    for row, value in enumerate(values):
        key = str(keys[row]) if keys and keys[row] is not None else f"{path.name}/{row}"
        if isinstance(value, dict):  # an HF Image struct: {bytes, path}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            value = _local_path(value, base, key)
            if isinstance(value, Failure):
                yield value
                continue
        yield key, value


def _local_path(value: str, base: Path, key: str) -> str | Failure:
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif "://" in value:
        return Failure(key, f"{value} is remote: download it first (e.g. with img2dataset), then embed its parquet")
    return str(base / value) if not os.path.isabs(value) else value


def _parquet_columns(schema, path: Path) -> tuple[str, str | None]:
    pa = need("pyarrow")

    names = {name.lower(): name for name in schema.names}
    image_column = None
    for candidate in BYTES_COLUMNS:
        name = names.get(candidate)
        if name is not None:
            kind = schema.field(name).type
            if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_struct(kind):
                image_column = name
                break
    if image_column is None:
        image_column = next((names[c] for c in PATH_COLUMNS if c in names), None)
    if image_column is None:
        raise ClipxferError(
            f"{path}: no image column; expected image bytes in one of {', '.join(BYTES_COLUMNS)} "
            f"or a path in one of {', '.join(PATH_COLUMNS)}"
        )
    key_column = next((names[c] for c in KEY_COLUMNS if c in names), None)
    return image_column, key_column


def _load_hf(root: Path):
    return need("datasets").load_from_disk(str(root))


def _hf_image_column(dataset, root: Path) -> str:
    from datasets import Image

    for name, feature in dataset.features.items():
        if isinstance(feature, Image):
            return name
    raise ClipxferError(f"{root}: the dataset has no Image column (features: {', '.join(dataset.features)})")


def _read_hf(unit: Unit) -> Iterator[Item]:
    from datasets import Image

    root = Path(unit.location)
    dataset = _load_hf(root)
    column = _hf_image_column(dataset, root)
    rows = dataset.select(range(unit.start, unit.stop)).cast_column(column, Image(decode=False))
    for offset, value in enumerate(rows[column]):
        key = str(unit.start + offset)
        payload = None
        if value:
            payload = value.get("bytes") or (_local_path(value["path"], root, key) if value.get("path") else None)
        if isinstance(payload, Failure):
            yield payload
            continue
        yield key, payload

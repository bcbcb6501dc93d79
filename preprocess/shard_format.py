"""The on-disk contract between preprocessing and every reader: shard names, sample keys, meta and stats.

Everything that writes or reads the output folder of ``preprocess.build_shards`` imports its names from
here, so the contract is stated once::

    out/meta.json               classes, splits -> shards (name, count, bytes, sha256), settings
    out/stats.npz, stats.json   training-set pixel statistics (see ``PixelStats``)
    out/rejected.jsonl          one line per unusable input: {"path", "reason"}
    out/<split>/<split>-NNNNNN.tar   WebDataset shard, samples shuffled globally
    out/<split>/<split>-NNNNNN.idx   DALI index of the shard beside it

A sample is ``<key>.jpg`` (the image), ``<key>.cls`` (class index, ASCII decimal) and ``<key>.lbl``
(the same index as a 4-byte little-endian int32, which DALI reads directly). Keys never contain a dot
(webdataset and DALI both split key and extension at the first dot) or whitespace (DALI's index files
separate their fields by whitespace).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")
META_FILE = "meta.json"
STATS_FILE = "stats.npz"
STATS_JSON = "stats.json"
REJECTED_FILE = "rejected.jsonl"

IMAGE_EXT = "jpg"
CLASS_EXT = "cls"
LABEL_EXT = "lbl"
SAMPLE_EXTS = (IMAGE_EXT, CLASS_EXT, LABEL_EXT)
INDEX_VERSION = "v1.2"


class DatasetError(RuntimeError):
    """A problem with the user's data or folders; its message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class Sample:
    key: str
    jpeg: bytes
    label: int

    def __post_init__(self) -> None:
        if not self.key or "." in self.key or "/" in self.key or any(c.isspace() for c in self.key):
            raise ValueError(f"sample key {self.key!r} must be non-empty and contain no '.', '/' or whitespace")


def shard_name(split: str, index: int) -> str:
    """``train-000012.tar``: the file name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def index_path(shard: str | Path) -> Path:
    """The DALI index file that sits beside a shard."""
    return Path(shard).with_suffix(".idx")


def encode_label(label: int) -> tuple[bytes, bytes]:
    """The ``cls`` (ASCII decimal) and ``lbl`` (int32 little-endian) components of a label."""
    return str(int(label)).encode("ascii"), np.int32(label).astype("<i4").tobytes()


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.mtime = 0  # fixed metadata: the same samples give byte-identical shards
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_USTAR_TEMPLATE = _tar_member("", 0).tobuf(tarfile.PAX_FORMAT)
_SIZE_FIELD, _CHECKSUM_FIELD = slice(124, 136), slice(148, 156)


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) that ``tarfile`` (POSIX pax format) writes for a member with our fixed metadata.

    Built from a template: tarfile's own header code was a tenth of a worker's time per image. Names that
    need an extended pax header (over 100 bytes, or not ASCII) are left to tarfile.
    """
    encoded = name.encode()
    if len(encoded) > 100 or not name.isascii() or size >= 8**11:
        return _tar_member(name, size).tobuf(tarfile.PAX_FORMAT)
    header = bytearray(_USTAR_TEMPLATE)
    header[: len(encoded)] = encoded
    header[_SIZE_FIELD] = b"%011o\0" % size
    header[_CHECKSUM_FIELD] = b" " * 8  # the checksum counts its own field as spaces
    header[_CHECKSUM_FIELD] = b"%06o\0 " % sum(header)
    return bytes(header)


def temporary_path(path: Path, suffix: str = "") -> Path:
    """A hidden name beside ``path`` to write into before the rename: process id and a random token, because jobs
    on other machines or in other containers (their own pid namespaces) may be writing beside it too."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def write_shard(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write a WebDataset tar and its DALI index; both appear under their final names only when complete.

    Returns the number of samples written. The index is written first and the tar renamed last, so a
    shard file that exists is always whole and indexed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_tar, tmp_idx = temporary_path(path), temporary_path(index_path(path))
    lines = []
    offset = 0
    with open(tmp_tar, "wb") as tar:
        for sample in samples:
            parts = []
            for ext, data in zip(SAMPLE_EXTS, (sample.jpeg, *encode_label(sample.label)), strict=True):
                name = f"{sample.key}.{ext}"
                header, padding = tar_header(name, len(data)), bytes(-len(data) % tarfile.BLOCKSIZE)
                tar.writelines((header, data, padding))
                parts.append(f"{ext} {offset + len(header)} {len(data)} {name}")
                offset += len(header) + len(data) + len(padding)
            lines.append(" ".join(parts))
        end = 2 * tarfile.BLOCKSIZE  # tarfile's end-of-archive: two zero blocks, padded to a whole record
        tar.write(bytes(end + -(offset + end) % tarfile.RECORDSIZE))
    tmp_idx.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
    os.replace(tmp_idx, index_path(path))
    os.replace(tmp_tar, path)
    return len(lines)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes under a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    tmp = temporary_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text under a temporary name, then rename: readers never see half a file."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, payload: object) -> None:
    """Write JSON under a temporary name, then rename: readers never see half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_meta(root: str | Path) -> dict:
    """The parsed ``meta.json`` of a shard folder, or a one-line ``DatasetError`` saying what to run."""
    root = Path(root)
    meta_path = root / META_FILE
    if not root.is_dir():
        raise DatasetError(
            f"data folder {root} does not exist: pass the out= folder written by preprocess.build_shards"
        )
    if not meta_path.is_file():
        raise DatasetError(
            f"{meta_path} not found: {root} is not a finished shard folder; pass the out= folder of "
            "preprocess.build_shards, or finish it by re-running that command"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{meta_path} is not valid JSON ({err}); re-run preprocess.build_shards") from None
    problem = _meta_problem(meta)
    if problem:
        raise DatasetError(f"{meta_path} is not build_shards' meta.json ({problem}): re-run preprocess.build_shards")
    return meta


def _meta_problem(meta: object) -> str:
    """What keeps ``meta`` from having everything the readers of meta.json index (so none meets a KeyError), or
    ``""``."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, kind in (("classes", list), ("splits", dict), ("settings", dict)):
        if not isinstance(meta.get(key), kind):
            return f"no {key} {'list' if kind is list else 'object'}"
    if not all(isinstance(c, dict) and {"index", "wnid", "name"} <= set(c) for c in meta["classes"]):
        return "a class without index, wnid or name"
    for split, info in meta["splits"].items():
        if not (isinstance(info, dict) and isinstance(info.get("count"), int) and isinstance(info.get("shards"), list)):
            return f"splits.{split} without count or shards"
        for number, shard in enumerate(info["shards"]):
            if not (isinstance(shard, dict) and {"name", "count", "bytes", "sha256"} <= set(shard)):
                return f"splits.{split}.shards[{number}] without name, count, bytes or sha256"
    if not isinstance(meta["settings"].get("image_size"), int):
        return "no settings.image_size"
    return ""


def dataset_fingerprint(meta: dict) -> str:
    """Names a shard folder's content (classes, settings, every shard's sha256) wherever the folder lies."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def shard_paths(root: str | Path, split: str, meta: dict | None = None) -> list[Path]:
    """The shards of ``split`` listed in ``meta.json``, checked to exist with their index files."""
    root = Path(root)
    meta = read_meta(root) if meta is None else meta
    if split not in meta.get("splits", {}):
        raise DatasetError(f"{root / META_FILE} has no split {split!r} (it has {sorted(meta.get('splits', {}))})")
    paths = [root / split / shard["name"] for shard in meta["splits"][split]["shards"]]
    if not paths:
        raise DatasetError(f"split {split!r} of {root} has no shards: re-run preprocess.build_shards with images in it")
    for path in paths:
        if not path.is_file() or not index_path(path).is_file():
            raise DatasetError(f"{path} or its .idx is missing: re-run preprocess.build_shards out={root} to finish it")
    return paths


@dataclass(frozen=True)
class PixelStats:
    """Training-set pixel statistics, RGB, 0-255 scale, accumulated in float64.

    ``eigval`` is descending and ``eigvec[:, i]`` belongs to ``eigval[i]``.
    """

    mean_image: np.ndarray  # (size, size, 3)
    mean: np.ndarray  # (3,)
    cov: np.ndarray  # (3, 3)
    eigval: np.ndarray  # (3,)
    eigvec: np.ndarray  # (3, 3)
    pixels: int

    FIELDS: Sequence[str] = ("mean_image", "mean", "cov", "eigval", "eigvec", "pixels")

    def save(self, root: str | Path) -> None:
        """Write ``stats.npz`` and a readable ``stats.json`` (everything but the mean image), atomically."""
        root = Path(root)
        tmp = temporary_path(root / STATS_FILE, ".npz")  # np.savez appends .npz to any other name
        np.savez(tmp, **{name: np.asarray(getattr(self, name)) for name in self.FIELDS})
        os.replace(tmp, root / STATS_FILE)
        readable = {name: np.asarray(getattr(self, name)).tolist() for name in self.FIELDS if name != "mean_image"}
        write_json_atomic(root / STATS_JSON, readable)

    @classmethod
    def load(cls, root: str | Path) -> PixelStats:
        path = Path(root) / STATS_FILE
        if not path.is_file():
            raise DatasetError(
                f"{path} not found: run `python -m preprocess.build_shards` to compute the training statistics"
            )
        try:
            with np.load(path) as data:
                missing = [name for name in cls.FIELDS if name not in data]
                if missing:
                    raise DatasetError(f"{path} lacks {missing}: it was not written by preprocess.build_shards")
                return cls(
                    **{
                        name: (int(data[name]) if name == "pixels" else data[name].astype(np.float64))
                        for name in cls.FIELDS
                    }
                )
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DatasetError(
                f"{path} is damaged ({type(err).__name__}: {err}): re-run the preprocess.build_shards command "
                "that wrote this folder, which rewrites it from its parts"
            ) from None

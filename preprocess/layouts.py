"""Find the images and labels of an ImageNet-style download, whichever of three layouts it comes in.

``scan(src, splits)`` returns one ``Record`` per input file: its sample key (the file stem), its class wnid and
where its bytes are (a file, or an offset and size inside a tar, so tars are never extracted). Supported::

    ImageFolder  src/train/<wnid>/*.JPEG, src/val/<wnid>/*.JPEG          (names: optional src/LOC_synset_mapping.txt)
    official     src/ILSVRC2012_img_train.tar (a tar of <wnid>.tar), src/ILSVRC2012_img_val.tar or the flat
                 folder src/ILSVRC2012_img_val/, and src/ILSVRC2012_devkit_t12(.tar.gz) for val labels and names
    Kaggle       src/ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}, src/LOC_val_solution.csv, src/LOC_synset_mapping.txt

Classes are the sorted wnids of the training images (or of the label file when there is no training data),
indexed 0..N-1 as torchvision does. The devkit's ground truth holds ILSVRC2012_IDs (meta.mat order, not
sorted wnid order); they are mapped through meta.mat to wnids, then to the sorted index.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from preprocess.shard_format import DatasetError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
VAL_DIR = "ILSVRC2012_img_val"
DEVKIT = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC"
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"

EXPECTED = (
    "expected one of: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (ImageFolder); "
    f"{TRAIN_TAR}, {VAL_TAR} (or {VAL_DIR}/) and {DEVKIT}.tar.gz (official ILSVRC-2012); "
    f"{KAGGLE_ROOT}/train|val with {KAGGLE_VAL_CSV} (Kaggle)"
)


@dataclass(frozen=True, slots=True)
class Record:
    """One input image: sample key, class wnid, and where its bytes are."""

    key: str
    wnid: str
    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file
    origin: str = ""  # readable location for rejected.jsonl (tar members: tar path / member name)

    def read(self) -> bytes:
        with open(self.path, "rb") as file:
            if self.size < 0:
                return file.read()
            file.seek(self.offset)
            return file.read(self.size)

    @property
    def where(self) -> str:
        return self.origin or self.path


@dataclass
class Dataset:
    """What ``scan`` found: the layout, the classes ``[(wnid, name)]`` in index order, records per split,
    and inputs already unusable before decoding (no label, duplicate key) as ``{"path", "reason"}``."""

    layout: str
    classes: list[tuple[str, str]]
    records: dict[str, list[Record]]
    unusable: list[dict] = field(default_factory=list)

    @property
    def class_index(self) -> dict[str, int]:
        return {wnid: index for index, (wnid, _) in enumerate(self.classes)}


def sample_key(file_name: str) -> str:
    """The sample key of a file: its stem, with further dots and any whitespace made underscores (webdataset and
    DALI split key and extension at the first dot; DALI's index files separate fields by whitespace)."""
    name = PurePosixPath(file_name).name
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return _key_safe(stem)


def _key_safe(text: str) -> str:
    return re.sub(r"[.\s]", "_", text)


def _files(folder: Path, unusable: list[dict]) -> list[Path]:
    """The files of ``folder``, sorted; anything else in it (a folder, a broken link) is listed as unusable."""
    files = []
    with os.scandir(folder) as entries:  # DirEntry.is_file() needs no stat call: fast on 1.3M files
        for entry in entries:
            if entry.is_file():
                files.append(Path(entry.path))
            elif entry.is_dir():
                unusable.append({"path": entry.path, "reason": f"a folder inside {folder}: its files are not read"})
            else:
                unusable.append({"path": entry.path, "reason": "not a file (a broken symbolic link?)"})
    return sorted(files)


def _class_folders(split_dir: Path, unusable: list[dict]) -> Iterator[Record]:
    """``split_dir/<wnid>/<file>`` records; files directly in ``split_dir`` are listed as unusable."""
    for entry in sorted(split_dir.iterdir()):
        if entry.is_dir():
            for path in _files(entry, unusable):
                yield Record(sample_key(path.name), entry.name, str(path))
        else:
            reason = f"not inside a class folder: expected {split_dir}/<wnid>/{entry.name}"
            unusable.append({"path": str(entry), "reason": reason})


def _flat_folder(folder: Path, labels: dict[str, str], unusable: list[dict]) -> Iterator[Record]:
    for path in _files(folder, unusable):
        key = sample_key(path.name)
        yield Record(key, labels.get(key, ""), str(path))


@contextlib.contextmanager
def _reading(path: Path, fix: str) -> Iterator[None]:
    """A damaged or truncated archive (or file inside it) as one DatasetError line instead of a traceback."""
    try:
        yield
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError, zlib.error) as err:
        raise DatasetError(f"{path} is damaged or truncated ({type(err).__name__}: {err}): {fix}") from None


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except tarfile.ReadError as err:
        raise DatasetError(f"{path} is not an uncompressed tar ({err}): use the original ILSVRC-2012 file") from None


def _tar_files(tar: tarfile.TarFile, where: Path | str) -> Iterator[tarfile.TarInfo]:
    """The file members of ``tar``, then a check that it ends with the end-of-archive block: tarfile stops without
    a word where a download was cut off between two members, or at a damaged header."""
    yield from (member for member in tar if member.isfile())
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise DatasetError(
            f"{where} is damaged or truncated (no end-of-archive block after its {len(tar.members)} members): "
            "download it again"
        )


def _not_a_class_tar(outer: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """Why ``member`` of the train tar is no per-class tar (a stray file, an empty tar), or ``""``."""
    if not member.name.endswith(".tar"):
        return "not named <wnid>.tar"
    try:
        with tarfile.open(fileobj=outer.extractfile(member), mode="r:"):
            return ""
    except tarfile.ReadError as err:
        return str(err)


def _train_tar(path: Path, unusable: list[dict]) -> Iterator[Record]:
    """Records of a tar of per-class tars, with absolute offsets into the outer tar: nothing is extracted. A member
    that is no readable ``<wnid>.tar`` (a stray file, an empty tar: its class keeps its index) is listed as
    unusable."""
    tar_path = str(path)  # one string shared by all 1.3M records
    with _reading(path, "download it again"), _open_tar(path) as outer:
        for member in _tar_files(outer, path):
            problem = _not_a_class_tar(outer, member)
            if problem:
                reason = f"not a readable per-class tar ({problem}): {TRAIN_TAR} holds one <wnid>.tar per class"
                unusable.append({"path": f"{path}/{member.name}", "reason": reason})
                continue
            wnid = sample_key(member.name)
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                for image in _tar_files(inner, f"{path}/{member.name}"):
                    origin = f"{path}/{member.name}/{image.name}"
                    offset = member.offset_data + image.offset_data
                    yield Record(sample_key(image.name), wnid, tar_path, offset, image.size, origin)


def _train_tar_wnids(path: Path) -> list[str]:
    with _reading(path, "download it again"), _open_tar(path) as outer:
        return sorted({sample_key(member.name) for member in _tar_files(outer, path) if member.name.endswith(".tar")})


def _flat_tar(path: Path, labels: dict[str, str]) -> Iterator[Record]:
    with _reading(path, "download it again"), _open_tar(path) as tar:
        for member in _tar_files(tar, path):
            key = sample_key(member.name)
            yield Record(key, labels.get(key, ""), str(path), member.offset_data, member.size, f"{path}/{member.name}")


def _read_synset_mapping(path: Path) -> dict[str, str]:
    """``n01440764 tench, Tinca tinca`` lines -> {wnid: name}; empty when the file is absent."""
    if not path.is_file():
        return {}
    with _reading(path, "it should hold lines like `n01440764 tench, Tinca tinca`, in UTF-8"):
        text = path.read_text(encoding="utf-8")
    lines = (line.strip().split(None, 1) for line in text.splitlines() if line.strip())
    return {parts[0]: (parts[1] if len(parts) > 1 else parts[0]) for parts in lines}


def _devkit_files(src: Path) -> tuple[bytes, str] | None:
    """(meta.mat bytes, ground-truth text) from the devkit folder or its .tar.gz, or None when absent."""
    folder, archive = src / DEVKIT, src / f"{DEVKIT}.tar.gz"
    if (folder / META_MAT).is_file():
        ground_truth = folder / GROUND_TRUTH
        with _reading(ground_truth, "download the devkit again"):
            return (folder / META_MAT).read_bytes(), ground_truth.read_text() if ground_truth.is_file() else ""
    if archive.is_file():
        with _reading(archive, "download the devkit again"), tarfile.open(archive, "r:*") as tar:
            files = {member.name: member for member in _tar_files(tar, archive)}

            def read(name: str) -> bytes:
                member = files.get(f"{DEVKIT}/{name}")
                return tar.extractfile(member).read() if member else b""

            meta_mat = read(META_MAT)
            if not meta_mat:
                raise DatasetError(f"{archive} has no {DEVKIT}/{META_MAT}: is it the ILSVRC-2012 devkit (t12)?")
            return meta_mat, read(GROUND_TRUTH).decode()
    return None


def read_devkit_synsets(meta_mat: bytes) -> tuple[dict[int, str], dict[str, str]]:
    """meta.mat -> ({ILSVRC2012_ID: wnid}, {wnid: words}) of the leaf classes (num_children == 0)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    ids, names = {}, {}
    try:
        for synset in loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"].ravel():
            if int(synset["num_children"]) == 0:
                wnid = str(synset["WNID"])
                ids[int(synset["ILSVRC2012_ID"])] = wnid
                names[wnid] = str(synset["words"])
    except (MatReadError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, zlib.error) as err:
        detail = " ".join(str(err).split())
        raise DatasetError(
            f"{DEVKIT}/{META_MAT} is damaged or not the ILSVRC-2012 devkit's ({type(err).__name__}: {detail}): "
            "download the devkit again"
        ) from None
    return ids, names


def devkit_val_labels(meta_mat: bytes, ground_truth: str) -> tuple[dict[str, str], dict[str, str]]:
    """({val key: wnid}, {wnid: name}): line i of the ground truth is ILSVRC2012_val_<i, 8 digits>."""
    ids, names = read_devkit_synsets(meta_mat)
    labels = {}
    for number, line in enumerate(ground_truth.split(), start=1):
        if not line.isdigit() or int(line) not in ids:
            raise DatasetError(f"devkit ground truth line {number} holds {line!r}, not an ILSVRC2012_ID of meta.mat")
        labels[f"ILSVRC2012_val_{number:08d}"] = ids[int(line)]
    return labels, names


def kaggle_val_labels(csv_path: Path) -> dict[str, str]:
    """LOC_val_solution.csv -> {ImageId: wnid}; the first token of PredictionString is the class."""
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path} not found: the Kaggle layout needs it for validation labels")
    with (
        _reading(csv_path, f"download Kaggle's {KAGGLE_VAL_CSV} again"),
        csv_path.open(newline="", encoding="utf-8-sig") as file,
    ):
        rows = list(csv.DictReader(file))  # utf-8-sig: a byte-order mark is not part of the first column's name
    if rows and not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise DatasetError(f"{csv_path} has no ImageId and PredictionString columns: is it Kaggle's {KAGGLE_VAL_CSV}?")
    predictions = {row["ImageId"]: (row["PredictionString"] or "").split() for row in rows}
    return {image_id: tokens[0] for image_id, tokens in predictions.items() if tokens}  # no class: no label


def _require(split: str, found: bool, src: Path, what: str) -> None:
    if not found:
        raise DatasetError(
            f"src {src} has no {split} images ({what} not found): add them or leave {split} out of splits="
        )


def _scan_imagefolder(src: Path, splits: Iterable[str]) -> Dataset:
    records, unusable = {}, []
    for split in splits:
        _require(split, (src / split).is_dir(), src, f"{split}/<wnid>/")
        records[split] = list(_class_folders(src / split, unusable))
    names = _read_synset_mapping(src / SYNSET_MAPPING)
    source = src / "train" if (src / "train").is_dir() else src / "val"
    wnids = sorted(path.name for path in source.iterdir() if path.is_dir())
    return Dataset("imagefolder", [(wnid, names.get(wnid, wnid)) for wnid in wnids], records, unusable)


def _scan_official(src: Path, splits: Iterable[str]) -> Dataset:
    devkit = _devkit_files(src)
    ids, names = read_devkit_synsets(devkit[0]) if devkit else ({}, {})
    records, unusable = {}, []
    for split in splits:
        if split == "train":
            _require(split, (src / TRAIN_TAR).is_file(), src, TRAIN_TAR)
            records[split] = list(_train_tar(src / TRAIN_TAR, unusable))
            continue
        if devkit is None:
            raise DatasetError(f"validation labels need the devkit: put {DEVKIT}.tar.gz (or the folder) into {src}")
        if not devkit[1].strip():
            raise DatasetError(f"the devkit in {src} has no {DEVKIT}/{GROUND_TRUTH}, or it is empty: download it again")
        labels, _ = devkit_val_labels(*devkit)
        if (src / VAL_TAR).is_file():
            records[split] = list(_flat_tar(src / VAL_TAR, labels))
        else:
            _require(split, (src / VAL_DIR).is_dir(), src, f"{VAL_TAR} or {VAL_DIR}/")
            records[split] = list(_flat_folder(src / VAL_DIR, labels, unusable))
    wnids = _train_tar_wnids(src / TRAIN_TAR) if (src / TRAIN_TAR).is_file() else sorted(ids.values())
    return Dataset("official", [(wnid, names.get(wnid, wnid)) for wnid in wnids], records, unusable)


def _scan_kaggle(src: Path, splits: Iterable[str]) -> Dataset:
    root = src / KAGGLE_ROOT
    records, unusable = {}, []
    for split in splits:
        _require(split, (root / split).is_dir(), src, f"{KAGGLE_ROOT}/{split}/")
        if split == "train":
            records[split] = list(_class_folders(root / split, unusable))
        else:
            records[split] = list(_flat_folder(root / split, kaggle_val_labels(src / KAGGLE_VAL_CSV), unusable))
    names = _read_synset_mapping(src / SYNSET_MAPPING)
    if (root / "train").is_dir():
        wnids = sorted(path.name for path in (root / "train").iterdir() if path.is_dir())
    else:
        wnids = sorted(names)
    return Dataset("kaggle", [(wnid, names.get(wnid, wnid)) for wnid in wnids], records, unusable)


def detect_layout(src: Path) -> str:
    """``imagefolder``, ``official`` or ``kaggle``; a one-line DatasetError when src matches none."""
    if not src.is_dir():
        raise DatasetError(f"src {src} is not a folder: point src= at the ImageNet download ({EXPECTED})")
    if (src / KAGGLE_ROOT).is_dir():
        return "kaggle"
    if any((src / name).exists() for name in (TRAIN_TAR, VAL_TAR, VAL_DIR)):
        return "official"
    if any((src / split).is_dir() and any(p.is_dir() for p in (src / split).iterdir()) for split in ("train", "val")):
        return "imagefolder"
    raise DatasetError(f"src {src} holds no dataset layout that build_shards knows: {EXPECTED}")


def _class_prefixed_keys(records: list[Record]) -> list[Record]:
    """Keys made unique where a file name repeats across classes (``0001.jpg`` in every class folder, as many
    non-ImageNet datasets have): those records' keys become ``<wnid>_<key>``. ImageNet's never repeat."""
    classes_of: dict[str, set[str]] = {}
    for record in records:
        classes_of.setdefault(record.key, set()).add(record.wnid)
    return [
        dataclasses.replace(record, key=f"{_key_safe(record.wnid)}_{record.key}")
        if len(classes_of[record.key]) > 1
        else record
        for record in records
    ]


def _is_utf8(text: str) -> bool:
    """False for a name that came from bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _drop_unusable(dataset: Dataset) -> Dataset:
    """Move records without a known class, or repeating an earlier key of their split, to ``unusable``."""
    known = dataset.class_index
    for split, records in dataset.records.items():
        kept, seen = [], set()
        for record in _class_prefixed_keys(records):
            if not _is_utf8(record.key):
                reason = "its name is not valid UTF-8 (shard keys and meta.json are): rename the file"
                dataset.unusable.append({"path": record.where, "reason": reason})
            elif not record.wnid:
                dataset.unusable.append({"path": record.where, "reason": f"no {split} label for key {record.key}"})
            elif record.wnid not in known:
                reason = f"class {record.wnid} is not among the {len(known)} training classes"
                dataset.unusable.append({"path": record.where, "reason": reason})
            elif record.key in seen:
                dataset.unusable.append(
                    {"path": record.where, "reason": f"duplicate sample key {record.key} in {split}"}
                )
            else:
                seen.add(record.key)
                kept.append(record)
        dataset.records[split] = kept
    return dataset


def _unusable_example(dataset: Dataset) -> str:
    """`` (N inputs unusable, e.g. PATH: REASON)`` for an error message, or nothing."""
    if not dataset.unusable:
        return ""
    first = dataset.unusable[0]
    return f" ({len(dataset.unusable)} inputs unusable, e.g. {first['path']}: {first['reason']})"


def scan(src: str | Path, splits: Iterable[str] = ("train", "val")) -> Dataset:
    """Detect the layout of ``src`` and list its records per split (sorted by key), classes and unusable inputs."""
    src = Path(src)
    splits = list(splits)
    unknown = set(splits) - {"train", "val"}
    if unknown:
        raise DatasetError(f"unknown split(s) {sorted(unknown)}: splits= takes train and/or val")
    scanner = {"imagefolder": _scan_imagefolder, "official": _scan_official, "kaggle": _scan_kaggle}[detect_layout(src)]
    dataset = scanner(src, splits)
    if not dataset.classes:
        raise DatasetError(f"src {src} has no class folders or labels{_unusable_example(dataset)}: {EXPECTED}")
    for wnid, _ in dataset.classes:
        if not _is_utf8(wnid):
            raise DatasetError(f"class {wnid!r} of {src} is not a valid UTF-8 name (meta.json records it): rename it")
    dataset = _drop_unusable(dataset)
    dataset.records = {split: sorted(records, key=lambda r: r.key) for split, records in dataset.records.items()}
    for split, records in dataset.records.items():
        if not records:
            raise DatasetError(
                f"src {src} has no usable {split} images{_unusable_example(dataset)}: "
                f"add them or leave {split} out of splits="
            )
    return dataset

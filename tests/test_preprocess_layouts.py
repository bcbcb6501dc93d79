"""The same images in every supported input layout give the same samples, labels and shard bytes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from preprocess.build_shards import build_shards
from preprocess.layouts import detect_layout, sample_key, scan
from preprocess.shard_format import DatasetError, PixelStats, read_meta
from preprocess.verify import verify

# devkit ILSVRC2012_IDs deliberately not in sorted-wnid order (as in the real meta.mat)
SYNSETS = {1: ("n03000003", "gamma"), 2: ("n01000001", "alpha"), 3: ("n02000002", "beta")}
SORTED_INDEX = {"n01000001": 0, "n02000002": 1, "n03000003": 2}
VAL_IDS = [3, 1, 2, 2, 3, 1, 1]  # ground truth, one ILSVRC2012_ID per val image in file-name order
TRAIN_PER_CLASS = 4


def photo_jpeg(seed: int) -> bytes:
    """A real-pixel JPEG of a random ImageNet-like aspect ratio."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(36, 90, size=2))
    field = cv2.resize(rng.uniform(0, 255, (3, 4, 3)).astype(np.float32), (width, height))
    image = np.clip(field + rng.normal(0, 4, field.shape), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def meta_mat_bytes() -> bytes:
    """A devkit meta.mat: a struct array of synsets, leaves first, plus one non-leaf as in the real file."""
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [
        (i, wnid, name, f"a {name}", 0, np.zeros((1, 0)), 0, TRAIN_PER_CLASS) for i, (wnid, name) in SYNSETS.items()
    ]
    rows.append((4, "n09999999", "entity", "everything", 3, np.array([[1, 2, 3]]), 5, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(field, "O") for field in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    buffer = io.BytesIO()
    savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, dict[str, bytes]]:
    """{"train": {wnid/file: bytes}, "val": {file: bytes}} with the val labels given by VAL_IDS."""
    names = [f"{wnid}/{wnid}_{n}.JPEG" for wnid, _ in SYNSETS.values() for n in range(1, TRAIN_PER_CLASS + 1)]
    train = {name: photo_jpeg(seed) for seed, name in enumerate(names)}
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": photo_jpeg(1000 + i) for i in range(1, len(VAL_IDS) + 1)}
    return {"train": train, "val": val}


def val_wnid(file_name: str) -> str:
    return SYNSETS[VAL_IDS[int(sample_key(file_name).rsplit("_", 1)[1]) - 1]][0]


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def write_imagefolder(root: Path, images: dict) -> Path:
    write_files(root / "train", images["train"])
    write_files(root / "val", {f"{val_wnid(name)}/{name}": data for name, data in images["val"].items()})
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid} {name}\n" for wnid, name in SYNSETS.values()))
    return root


def write_official(root: Path, images: dict, *, val_as_folder: bool = False) -> Path:
    per_class = {
        f"{wnid}.tar": tar_bytes(
            {name.split("/")[1]: data for name, data in images["train"].items() if name.startswith(wnid)}
        )
        for wnid, _ in SYNSETS.values()
    }
    root.mkdir(parents=True)
    (root / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(per_class))
    devkit = {
        "ILSVRC2012_devkit_t12/data/meta.mat": meta_mat_bytes(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(
            f"{i}\n" for i in VAL_IDS
        ).encode(),
    }
    if val_as_folder:
        write_files(root / "ILSVRC2012_img_val", images["val"])
        write_files(root, devkit)
    else:
        (root / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(images["val"]))
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            for name, data in devkit.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def write_kaggle(root: Path, images: dict) -> Path:
    data_root = root / "ILSVRC/Data/CLS-LOC"
    write_files(data_root / "train", images["train"])
    write_files(data_root / "val", images["val"])
    with (root / "LOC_val_solution.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["ImageId", "PredictionString"])
        for name in reversed(sorted(images["val"])):  # row order must not matter
            wnid = val_wnid(name)
            writer.writerow([sample_key(name), f"{wnid} 1 2 30 40 {wnid} 5 6 20 25"])
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid} {name}\n" for wnid, name in sorted(SYNSETS.values())))
    return root


@pytest.fixture(scope="module")
def sources(images, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        "imagefolder": write_imagefolder(root / "imagefolder", images),
        "official": write_official(root / "official", images),
        "official-val-folder": write_official(root / "official-val-folder", images, val_as_folder=True),
        "kaggle": write_kaggle(root / "kaggle", images),
    }


def expected_labels(images: dict) -> dict[str, dict[str, int]]:
    """Independent of the code under test: sorted-wnid indices from the file names and the ground-truth list."""
    return {
        "train": {sample_key(name): SORTED_INDEX[name.split("/")[0]] for name in images["train"]},
        "val": {sample_key(name): SORTED_INDEX[val_wnid(name)] for name in images["val"]},
    }


@pytest.mark.parametrize("layout", ["imagefolder", "official", "official-val-folder", "kaggle"])
def test_scan_finds_every_image_with_its_label_and_the_same_bytes(layout, sources, images):
    dataset = scan(sources[layout], ("train", "val"))
    assert dataset.layout == layout.removesuffix("-val-folder")
    assert dataset.classes == sorted(SYNSETS.values())
    index = dataset.class_index
    found = {split: {r.key: index[r.wnid] for r in records} for split, records in dataset.records.items()}
    assert found == expected_labels(images)
    by_key = {sample_key(name): data for split in images.values() for name, data in split.items()}
    assert all(record.read() == by_key[record.key] for records in dataset.records.values() for record in records)
    assert dataset.unusable == []


def test_every_layout_writes_byte_identical_shards(sources, tmp_path):
    outputs = {}
    for layout, src in sources.items():
        out = tmp_path / layout
        build_shards(src, out, image_size=32, shard_size=5, workers=1, show_progress=False)
        outputs[layout] = out
    reference = outputs["imagefolder"]
    shard_files = sorted(p.relative_to(reference) for split in ("train", "val") for p in (reference / split).iterdir())
    assert len(shard_files) == 2 * (3 + 2)  # 12 train -> 3 shards, 7 val -> 2 shards, each .tar + .idx
    for layout, out in outputs.items():
        assert sorted(p.relative_to(out) for split in ("train", "val") for p in (out / split).iterdir()) == shard_files
        assert all((out / f).read_bytes() == (reference / f).read_bytes() for f in shard_files), layout
        ours, theirs = PixelStats.load(out), PixelStats.load(reference)
        assert all(np.array_equal(getattr(ours, f), getattr(theirs, f)) for f in PixelStats.FIELDS), layout
        meta = read_meta(out)
        assert meta["classes"] == [
            {"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(sorted(SYNSETS.values()))
        ]
        assert meta["settings"]["layout"] == layout.removesuffix("-val-folder")


def test_val_images_without_ground_truth_are_listed_not_fatal(sources, tmp_path):
    src = shutil.copytree(sources["official-val-folder"], tmp_path / "src")
    (src / "ILSVRC2012_img_val" / "ILSVRC2012_val_00000099.JPEG").write_bytes(photo_jpeg(99))
    dataset = scan(src, ("val",))
    assert len(dataset.records["val"]) == len(VAL_IDS)
    assert [entry["reason"] for entry in dataset.unusable] == ["no val label for key ILSVRC2012_val_00000099"]


def test_sample_keys_are_stems_without_dots():
    assert sample_key("n01440764_10026.JPEG") == "n01440764_10026"
    assert sample_key("dir/ILSVRC2012_val_00000001.JPEG") == "ILSVRC2012_val_00000001"
    assert sample_key("photo.v2.jpg") == "photo_v2"
    assert sample_key(".DS_Store") == "_DS_Store"
    assert sample_key("my photo\t2.jpg") == "my_photo_2"  # DALI's index files separate fields by whitespace


def test_generic_imagefolder_names_stray_files_and_repeated_names(tmp_path):
    """Not ImageNet: file names repeat across classes, files lie outside class folders, a link is broken."""
    src = tmp_path / "src"
    for wnid in ("cat", "dog"):
        for name in ("0001.jpg", "0002.jpg", "my photo.jpg"):
            (src / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (src / "train" / wnid / name).write_bytes(photo_jpeg(len(name)))
    (src / "train" / "cat" / "0001.png").write_bytes(photo_jpeg(7))  # same class, same key as 0001.jpg
    (src / "train" / "loose.jpg").write_bytes(photo_jpeg(8))
    (src / "train" / "dog" / "nested").mkdir()
    (src / "train" / "dog" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    dataset = scan(src, ("train",))
    keys = {record.key: record.wnid for record in dataset.records["train"]}
    assert keys == {f"{w}_{k}": w for w in ("cat", "dog") for k in ("0001", "0002", "my_photo")}
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in dataset.unusable}
    assert set(reasons) == {"0001.png", "loose.jpg", "nested", "broken.jpg"}
    assert "duplicate sample key cat_0001" in reasons["0001.png"] and "class folder" in reasons["loose.jpg"]

    out = tmp_path / "out"
    summary = build_shards(src, out, splits=["train"], image_size=32, workers=1, show_progress=False)
    assert summary["counts"] == {"train": 6} and summary["rejected"] == 4
    assert verify(out) == []  # its checks include the DALI index of every shard, keys with spaces made _


def test_class_folders_with_dots_keep_their_repeated_file_names_apart(tmp_path):
    for wnid in ("cat.v1", "cat.v2"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        (tmp_path / "train" / wnid / "0001.jpg").write_bytes(photo_jpeg(1))
    dataset = scan(tmp_path, ("train",))
    assert [record.key for record in dataset.records["train"]] == ["cat_v1_0001", "cat_v2_0001"]
    assert dataset.unusable == []


def test_flat_val_folder_in_imagefolder_layout_is_one_clear_line(sources, tmp_path):
    src = shutil.copytree(sources["imagefolder"], tmp_path / "src")
    for path in list((src / "val").rglob("*.JPEG")):
        path.rename(src / "val" / path.name)
    for folder in [p for p in (src / "val").iterdir() if p.is_dir()]:
        folder.rmdir()
    with pytest.raises(DatasetError, match=r"no usable val images \(7 inputs unusable, e.g. .*not inside a class"):
        scan(src, ("train", "val"))


def test_damaged_archives_and_label_files_are_one_clear_line(sources, tmp_path):
    src = shutil.copytree(sources["official"], tmp_path / "src")
    train_tar = src / "ILSVRC2012_img_train.tar"
    train_tar.write_bytes(train_tar.read_bytes()[: train_tar.stat().st_size // 2])  # an interrupted download
    with pytest.raises(DatasetError, match="is damaged or truncated.*download it again"):
        scan(src, ("train",))
    devkit = src / "ILSVRC2012_devkit_t12.tar.gz"
    devkit.write_bytes(devkit.read_bytes()[:200])
    with pytest.raises(DatasetError, match="ILSVRC2012_devkit_t12.tar.gz is damaged or truncated"):
        scan(src, ("val",))

    kaggle = shutil.copytree(sources["kaggle"], tmp_path / "kaggle")
    solution = kaggle / "LOC_val_solution.csv"
    lines = solution.read_text().splitlines()
    first_id = lines[1].split(",")[0]
    solution.write_text("\n".join([lines[0], f"{first_id},", *lines[2:]]) + "\n")  # a row without a box
    dataset = scan(kaggle, ("val",))
    assert [entry["reason"] for entry in dataset.unusable] == [f"no val label for key {first_id}"]
    solution.write_text("\ufeff" + solution.read_text(), encoding="utf-8")  # a byte-order mark (Excel's CSVs)
    assert len(scan(kaggle, ("val",)).records["val"]) == len(VAL_IDS) - 1
    mapping = kaggle / "LOC_synset_mapping.txt"
    mapping.write_bytes(mapping.read_bytes() + b"n04000004 caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(DatasetError, match="LOC_synset_mapping.txt is damaged or truncated.*UTF-8"):
        scan(kaggle, ("val",))
    mapping.write_bytes(mapping.read_bytes()[: -len(b"n04000004 caf\xe9\n")])
    official = shutil.copytree(sources["official-val-folder"], tmp_path / "official")  # the devkit as a folder
    (official / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\nx\n")
    with pytest.raises(DatasetError, match="ground truth line 3 holds 'x'"):
        scan(official, ("val",))
    solution.write_text("id,label\nx,y\n")
    with pytest.raises(DatasetError, match="no ImageId and PredictionString columns"):
        scan(kaggle, ("val",))


def test_unknown_or_incomplete_sources_get_one_clear_line(sources, tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        detect_layout(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="expected one of: train/<wnid>"):
        scan(tmp_path / "empty")
    no_devkit = shutil.copytree(sources["official"], tmp_path / "no-devkit")
    (no_devkit / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    with pytest.raises(DatasetError, match="validation labels need the devkit"):
        scan(no_devkit, ("train", "val"))
    assert len(scan(no_devkit, ("train",)).records["train"]) == 3 * TRAIN_PER_CLASS
    gz = tmp_path / "gz"
    gz.mkdir()
    with tarfile.open(gz / "ILSVRC2012_img_train.tar", "w:gz") as tar:
        tar.add(sources["official"] / "ILSVRC2012_img_val.tar", arcname="n01000001.tar")
    with pytest.raises(DatasetError, match="not an uncompressed tar"):
        scan(gz, ("train",))
    (gz / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes({"README.txt": b"not a class tar\n"}))
    with pytest.raises(DatasetError, match="README.txt: not a readable per-class tar"):
        scan(gz, ("train",))
    train_only = shutil.copytree(sources["imagefolder"], tmp_path / "train-only")
    shutil.rmtree(train_only / "val")
    with pytest.raises(DatasetError, match="has no val images"):
        scan(train_only, ("train", "val"))


def cut_after_member(data: bytes, index: int) -> bytes:
    """The tar ``data`` cut right after member ``index``'s (padded) data: an interrupted download, ending exactly
    where a member does."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmembers()[index]
    return data[: member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE]


def test_tars_cut_between_two_members_are_refused(sources, tmp_path):
    """tarfile itself ends iteration without a word there; every image after the cut would silently be missing."""
    src = shutil.copytree(sources["official"], tmp_path / "src")
    val_tar = src / "ILSVRC2012_img_val.tar"
    whole = val_tar.read_bytes()
    val_tar.write_bytes(cut_after_member(whole, 2))
    with pytest.raises(DatasetError, match="ILSVRC2012_img_val.tar is damaged or truncated.*download it again"):
        scan(src, ("val",))
    val_tar.write_bytes(whole)
    train_tar = src / "ILSVRC2012_img_train.tar"
    train_tar.write_bytes(cut_after_member(train_tar.read_bytes(), 1))  # the third class tar is missing
    with pytest.raises(DatasetError, match="ILSVRC2012_img_train.tar is damaged or truncated"):
        scan(src, ("train",))
    with pytest.raises(DatasetError, match="ILSVRC2012_img_train.tar is damaged or truncated"):
        scan(src, ("val",))  # its class list sets the label indices of val too
    with tarfile.open(fileobj=io.BytesIO((sources["official"] / "ILSVRC2012_img_train.tar").read_bytes())) as tar:
        class_tars = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    class_tars["n02000002.tar"] = cut_after_member(class_tars["n02000002.tar"], 1)  # inside a whole outer tar
    train_tar.write_bytes(tar_bytes(class_tars))
    with pytest.raises(DatasetError, match="ILSVRC2012_img_train.tar/n02000002.tar is damaged or truncated"):
        scan(src, ("train",))


def test_stray_and_empty_members_of_the_train_tar_are_listed_not_fatal(sources, tmp_path):
    src = shutil.copytree(sources["official"], tmp_path / "src")
    train_tar = src / "ILSVRC2012_img_train.tar"
    with tarfile.open(train_tar) as tar:
        class_tars = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    train_tar.write_bytes(tar_bytes({**class_tars, "n04000004.tar": b"", "README.txt": b"ILSVRC-2012\n"}))
    dataset = scan(src, ("train",))
    assert len(dataset.records["train"]) == 3 * TRAIN_PER_CLASS
    # the empty class keeps its index (torchvision's rule for an empty class folder); the stray file is no class
    assert [wnid for wnid, _ in dataset.classes] == [*sorted(SORTED_INDEX), "n04000004"]
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in dataset.unusable}
    assert set(reasons) == {"n04000004.tar", "README.txt"}
    assert all("not a readable per-class tar" in reason for reason in reasons.values())


def test_file_names_that_are_not_utf8_are_listed_not_fatal(sources, tmp_path):
    src = shutil.copytree(sources["imagefolder"], tmp_path / "src")
    bad_name = os.fsencode(src / "train" / "n01000001") + b"/caf\xe9.JPEG"  # Latin-1 bytes
    try:
        with open(bad_name, "wb") as file:
            file.write(photo_jpeg(5))
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "out"
    summary = build_shards(src, out, splits=["train"], image_size=32, workers=1, show_progress=False)
    assert summary["counts"] == {"train": 3 * TRAIN_PER_CLASS} and summary["rejected"] == 1
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [os.fsencode(entry["path"]) for entry in rejected] == [bad_name]
    assert "not valid UTF-8" in rejected[0]["reason"]
    os.rename(os.fsencode(src / "train" / "n01000001"), os.fsencode(src / "train") + b"/n01\xff")
    with pytest.raises(DatasetError, match="is not a valid UTF-8 name"):
        scan(src, ("train",))


def test_a_damaged_devkit_is_one_clear_line(sources, tmp_path):
    src = shutil.copytree(sources["official-val-folder"], tmp_path / "src")
    meta_mat = src / "ILSVRC2012_devkit_t12/data/meta.mat"
    good = meta_mat.read_bytes()
    for damaged in (good[: len(good) // 2], b"MATLAB 5.0" * 40, good.replace(b"num_children", b"num_kids_xxxx")):
        meta_mat.write_bytes(damaged)
        with pytest.raises(DatasetError, match="meta.mat is damaged or not the ILSVRC-2012 devkit's"):
            scan(src, ("val",))
    meta_mat.write_bytes(good)
    (src / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").unlink()
    with pytest.raises(DatasetError, match="has no ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth"):
        scan(src, ("val",))

"""build_shards end to end: readers (webdataset, DALI), statistics, determinism, resume, bad input, parts, verify."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from preprocess.build_shards import ShardTask, build_shards, write_shard_task
from preprocess.layouts import Record
from preprocess.shard_format import DatasetError, PixelStats, Sample, read_meta, shard_paths, write_shard
from preprocess.stats import PixelAccumulator
from preprocess.verify import verify

REPO = Path(__file__).resolve().parents[1]
SIZE = 80  # conftest's SHARD_IMAGE_SIZE


def source_labels(src: Path, split: str) -> dict[str, int]:
    """key -> sorted-wnid index, straight from the ImageFolder tree."""
    wnids = sorted(p.name for p in (src / "train").iterdir())
    return {f.stem: wnids.index(f.parent.name) for f in (src / split).glob("*/*")}


def read_with_webdataset(root: Path, split: str) -> list[tuple[str, int, int, bytes]]:
    """(key, cls, lbl, jpg) of every sample, in shard order, read by webdataset."""
    import webdataset as wds

    urls = [str(p) for p in shard_paths(root, split)]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [(s["__key__"], int(s["cls"]), int(np.frombuffer(s["lbl"], "<i4")[0]), s["jpg"]) for s in dataset]


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for split in ("train", "val") for p in sorted((root / split).iterdir())
    }


def test_shards_hold_every_image_once_with_its_label(shard_root, digits_src):
    meta = read_meta(shard_root)
    assert meta["settings"]["image_size"] == SIZE and len(meta["classes"]) == 10
    for split in ("train", "val"):
        samples = read_with_webdataset(shard_root, split)
        expected = source_labels(digits_src, split)
        assert {key: cls for key, cls, _, _ in samples} == expected
        assert len(samples) == len(expected) == meta["splits"][split]["count"]
        assert all(cls == lbl for _, cls, lbl, _ in samples)
        assert all(decode(jpeg).shape == (SIZE, SIZE, 3) for *_, jpeg in samples)
        sizes = [shard["count"] for shard in meta["splits"][split]["shards"]]
        assert sizes == [min(40, len(expected) - 40 * i) for i in range(len(sizes))]
        for shard, path in zip(meta["splits"][split]["shards"], shard_paths(shard_root, split), strict=True):
            assert shard["bytes"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_samples_are_shuffled_across_classes(shard_root):
    samples = read_with_webdataset(shard_root, "train")
    first_shard = [cls for _, cls, _, _ in samples[:40]]
    assert len(set(first_shard)) >= 6  # class-ordered shards would hold one or two classes
    keys = [key for key, *_ in samples]
    assert keys != sorted(keys)


def test_stored_image_is_the_resized_central_crop(shard_root, digits_src):
    key, _, _, jpeg = read_with_webdataset(shard_root, "val")[0]
    source = np.asarray(Image.open(next(digits_src.glob(f"val/*/{key}.JPEG"))).convert("RGB"))
    height, width = source.shape[:2]
    scale = SIZE / min(height, width)
    resized = Image.fromarray(source).resize(
        (max(SIZE, round(width * scale)), max(SIZE, round(height * scale))),
        Image.BOX if scale < 1 else Image.BICUBIC,  # Pillow's own area / cubic filters: an independent resize
    )
    left, top = (resized.width - SIZE) // 2, (resized.height - SIZE) // 2
    reference = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float64)
    assert np.abs(decode(jpeg) - reference).mean() < 6.0


def test_stats_equal_numpy_over_the_decoded_training_images(shard_root):
    images = np.stack([decode(jpeg) for *_, jpeg in read_with_webdataset(shard_root, "train")])
    pixels = images.reshape(-1, 3).astype(np.float64)
    stats = PixelStats.load(shard_root)
    assert stats.pixels == len(pixels)
    np.testing.assert_allclose(stats.mean_image, images.mean(axis=0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(pixels.T, bias=True), rtol=1e-9)
    eigval, eigvec = np.linalg.eigh(np.cov(pixels.T, bias=True))
    np.testing.assert_allclose(stats.eigval, eigval[::-1], rtol=1e-9)
    np.testing.assert_allclose(np.abs(stats.eigvec), np.abs(eigvec[:, ::-1]), atol=1e-9)
    readable = json.loads((shard_root / "stats.json").read_text())
    np.testing.assert_allclose(readable["eigval"], stats.eigval)


def read_with_dali(root: Path, split: str) -> list[tuple[str, int, bytes]]:
    """(key, label, decoded RGB bytes) of every sample, read by DALI through the index files."""
    from nvidia.dali import fn, pipeline_def, types

    paths = [str(p) for p in shard_paths(root, split)]
    count = read_meta(root)["splits"][split]["count"]

    @pipeline_def(batch_size=count, num_threads=1, device_id=None)
    def pipe():
        jpeg, label = fn.readers.webdataset(
            paths=paths,
            index_paths=[str(Path(p).with_suffix(".idx")) for p in paths],
            ext=["jpg", "lbl"],
            dtypes=[types.UINT8, types.INT32],
            missing_component_behavior="error",
            name="reader",
        )
        image = fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)
        return image, label, fn.get_property(jpeg, key="source_info")

    dali = pipe()
    dali.build()
    assert dali.epoch_size("reader") == count
    images, labels, infos = dali.run()
    keys = [bytes(np.asarray(infos[i])).decode().rsplit(":", 1)[-1].rsplit(".", 1)[0] for i in range(count)]
    return [(keys[i], int(np.asarray(labels[i])[0]), np.asarray(images[i]).tobytes()) for i in range(count)]


def test_dali_reads_the_shards_with_their_index_files(shard_root):
    from_dali = sorted(read_with_dali(shard_root, "train"))
    from_wds = sorted(
        (key, cls, cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1), cv2.COLOR_BGR2RGB).tobytes())
        for key, cls, _, jpeg in read_with_webdataset(shard_root, "train")
    )
    assert from_dali == from_wds


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path):
    """write_shard builds its tar headers itself, for speed: tarfile writing the same members gives the same file,
    and the index's offsets are where tarfile finds each member's data."""
    rng = np.random.default_rng(0)
    keys = ["n01440764_10026", "k" * 96, "k" * 97, "é_non_ascii", "z"]  # names of 100 and 101 bytes: ustar, pax
    samples = [
        Sample(key, rng.bytes(size), label)
        for key, size, label in zip(keys, [0, 1, 511, 512, 70000], [0, 7, 999, 123456, 5], strict=True)
    ]
    write_shard(tmp_path / "ours.tar", samples)
    with tarfile.open(tmp_path / "tarfile.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            for ext, data in (
                ("jpg", sample.jpeg),
                ("cls", b"%d" % sample.label),
                ("lbl", struct.pack("<i", sample.label)),
            ):
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "tarfile.tar").read_bytes()
    with tarfile.open(tmp_path / "tarfile.tar") as tar:
        expected = [f"{m.name.rsplit('.', 1)[1]} {m.offset_data} {m.size} {m.name}" for m in tar.getmembers()]
    index = (tmp_path / "ours.idx").read_text().splitlines()
    assert index[0] == f"v1.2 {len(samples)}"
    assert " ".join(index[1:]).split() == " ".join(expected).split()


def test_an_input_unreadable_when_its_turn_comes_is_rejected_and_the_rest_written(digits_src, tmp_path):
    files = sorted((digits_src / "train").glob("*/*"))[:20]
    records = [Record(f.stem, f.parent.name, str(f)) for f in files]
    records[5] = Record("gone_1", "d0", str(tmp_path / "deleted.JPEG"))  # listed, then deleted before its read
    task = ShardTask(str(tmp_path / "out"), "train", 0, tuple((r, 0) for r in records), SIZE, 90, 10**8)
    task.part_path.parent.mkdir(parents=True)
    info = write_shard_task(task)
    assert info["count"] == 19
    assert [(r["path"], r["reason"].split(":")[0]) for r in info["rejected"]] == [
        (str(tmp_path / "deleted.JPEG"), "FileNotFoundError")
    ]
    with tarfile.open(task.path) as tar:
        keys = [name[: -len(".jpg")] for name in tar.getnames() if name.endswith(".jpg")]
    assert keys == [record.key for i, record in enumerate(records) if i != 5]


def test_one_worker_writes_the_same_bytes_as_two(shard_root, digits_src, tmp_path):
    build_shards(digits_src, tmp_path / "w1", image_size=SIZE, shard_size=40, workers=1, show_progress=False)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(shard_root)
    assert (tmp_path / "w1" / "meta.json").read_text() == (shard_root / "meta.json").read_text()
    ours, theirs = PixelStats.load(tmp_path / "w1"), PixelStats.load(shard_root)
    assert all(np.array_equal(getattr(ours, f), getattr(theirs, f)) for f in PixelStats.FIELDS)


def run_cli(*args: str, cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs)


def test_paths_reach_the_commands_as_typed(digits_src, tmp_path):
    """Hydra would read src=2012 as a number, out=true as a boolean, a quote or a comma as its grammar's: the
    commands take their path values literally (interpolations still work)."""
    shutil.copytree(digits_src / "train" / "d0", tmp_path / "2012" / "train" / "d0")
    shutil.copytree(digits_src / "train" / "d1", tmp_path / "2012" / "train" / "d1")
    out = "it's [a,b]=c\\"
    done = run_cli(
        "preprocess.build_shards", "src=2012", f"out={out}", "splits=train", "image_size=32", "show_progress=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0 and "dataset complete" in done.stdout, done.stderr
    assert (tmp_path / out / "meta.json").is_file()
    checked = run_cli("preprocess.verify", f"out={out}", cwd=tmp_path)
    assert checked.returncode == 0 and checked.stdout.startswith(f"{out}: OK"), checked.stderr
    env = {**os.environ, "SHARDS": str(tmp_path / out)}
    checked = run_cli("preprocess.verify", "out=${oc.env:SHARDS}", cwd=tmp_path, env=env)
    assert checked.returncode == 0 and checked.stdout.startswith(f"{tmp_path / out}: OK"), checked.stderr
    for name in ("256", "true"):
        missing = run_cli("preprocess.verify", f"out={name}", cwd=tmp_path)
        assert missing.returncode == 2 and missing.stderr == f"error: data folder {name} does not exist: " + (
            "pass the out= folder written by preprocess.build_shards\n"
        )
    empty = run_cli("preprocess.build_shards", "src=2012", "out=", cwd=tmp_path)  # not the current folder
    assert empty.returncode == 2 and "both src= (the ImageNet download) and out=" in empty.stderr, empty.stderr


def test_killed_run_resumes_to_the_same_output(digits_src, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "preprocess.build_shards", f"src={digits_src}", f"out={out}"]
    command += ["image_size=48", "shard_size=8", "workers=1", "show_progress=false"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((out / "parts").glob("train-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = list((out / "parts").glob("*-*.npz"))
    assert 0 < len(done) < 25, "the kill should land mid-run (25 shards)"
    assert not (out / "meta.json").exists()
    for shard in (out / "train").glob("*.tar"):  # whatever has its final name is a whole, readable shard
        with tarfile.open(shard) as tar:
            assert len(tar.getmembers()) % 3 == 0
    # a stale temporary from a kill at any point is cleaned up too
    (out / "train" / ".train-000019.tar.tmp-12345").write_bytes(b"half a shard")

    resumed = run_cli(*command[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"({len(done)} already complete)" in resumed.stdout
    build_shards(digits_src, tmp_path / "whole", image_size=48, shard_size=8, workers=2, show_progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert (out / "meta.json").read_text() == (tmp_path / "whole" / "meta.json").read_text()
    assert not list(out.rglob("*.tmp-*"))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "sigkill"])
def test_a_stopped_run_leaves_no_worker_behind(stop, digits_src, tmp_path):
    """Ctrl-C reaches the whole process group; `kill` or a scheduler stops the main process only: either way no
    worker lives on, and a stop the command can handle is one line, no traceback from any process."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "preprocess.build_shards", f"src={digits_src}", f"out={out}"]
    command += ["image_size=48", "shard_size=8", "workers=2", "show_progress=false"]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 60
    if stop == signal.SIGINT:  # Ctrl-C while the workers are still importing, to the whole group, as a terminal does
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        while len(children.read_text().split()) < 3 and time.monotonic() < deadline:  # resource tracker + 2 workers
            time.sleep(0.005)
        while process.poll() is None and time.monotonic() < deadline:  # again if one lands while workers start
            os.killpg(process.pid, stop)
            time.sleep(0.3)
    else:
        while not list((out / "parts").glob("train-*.npz")) and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(stop)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == (-stop if stop == signal.SIGKILL else 128 + stop), stderr
    if stop != signal.SIGKILL:
        assert stderr.strip() == "interrupted: complete shards are kept; run the same command again to finish"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # anything left of the run's process group?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the stopped run")


def test_parts_share_the_work_and_the_last_one_merges(shard_root, digits_src, tmp_path):
    out = tmp_path / "parts"
    first = build_shards(
        digits_src, out, image_size=SIZE, shard_size=40, workers=1, part=0, parts=2, show_progress=False
    )
    assert not first["complete"] and not (out / "meta.json").exists()
    assert first["shards_written"] == 3 and first["shards_missing"] == 2
    second = build_shards(
        digits_src, out, image_size=SIZE, shard_size=40, workers=1, part=1, parts=2, show_progress=False
    )
    assert second["complete"] and second["shards_written"] == 2
    assert shard_bytes(out) == shard_bytes(shard_root)
    assert (out / "meta.json").read_text() == (shard_root / "meta.json").read_text()


def test_the_first_plan_written_wins_and_later_ones_are_compared_with_it(tmp_path):
    """Part jobs with different settings starting together: one creates plan.json, the other must match it."""
    from preprocess.build_shards import _create_once

    _create_once(tmp_path / "plan.json", "first")
    _create_once(tmp_path / "plan.json", "second")
    assert (tmp_path / "plan.json").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_concurrent_part_jobs_on_an_empty_folder_give_the_same_dataset(shard_root, digits_src, tmp_path):
    out = tmp_path / "concurrent"
    common = [f"src={digits_src}", f"out={out}", f"image_size={SIZE}", "shard_size=40", "workers=1", "parts=2"]
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "preprocess.build_shards", *common, f"part={part}", "show_progress=false"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in (0, 1)
    ]
    outputs = [job.communicate(timeout=120) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert any("dataset complete" in stdout for stdout, _ in outputs)
    assert shard_bytes(out) == shard_bytes(shard_root)
    assert (out / "meta.json").read_text() == (shard_root / "meta.json").read_text()


@pytest.fixture()
def quirky_src(digits_src, tmp_path) -> Path:
    """The digits' train/val tree plus every kind of odd file in one class folder."""
    src = shutil.copytree(digits_src, tmp_path / "quirky")
    folder = src / "train" / "d3"
    rgb = np.asarray(Image.open(next(folder.iterdir())).convert("RGB"))
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk_1.JPEG", quality=95)
    Image.fromarray(rgb).convert("L").save(folder / "grey_1.JPEG", quality=95)
    Image.fromarray(rgb).save(folder / "png_1.JPEG", format="PNG")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(folder / "rgba_1.png")
    Image.fromarray(rgb[:3, :5]).save(folder / "tiny_1.JPEG", quality=95)
    Image.fromarray(np.tile(rgb, (1, 12, 1))[:20]).save(folder / "wide_1.JPEG", quality=95)
    (folder / "truncated_1.JPEG").write_bytes((folder / "cmyk_1.JPEG").read_bytes()[:-300])
    (folder / "empty_1.JPEG").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    Image.new("RGB", (300, 300)).save(folder / "bomb_1.JPEG", quality=50)
    Image.fromarray(rgb).save(folder / f"long_{'x' * 150}_1.JPEG", quality=95)  # a tar name over 100 bytes
    return src


def test_unusable_files_are_listed_and_everything_else_is_written(quirky_src, tmp_path):
    out = tmp_path / "out"
    summary = build_shards(
        quirky_src, out, image_size=48, shard_size=64, workers=2, show_progress=False, max_pixels=50_000
    )
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in rejected}
    assert set(reasons) == {"truncated_1.JPEG", "empty_1.JPEG", "notes.txt", "bomb_1.JPEG"}
    assert "truncated" in reasons["truncated_1.JPEG"] and "empty" in reasons["empty_1.JPEG"]
    assert "not an image" in reasons["notes.txt"] and "decompression bomb" in reasons["bomb_1.JPEG"]
    assert summary["rejected"] == 4 and read_meta(out)["rejected"] == 4
    keys = {key for key, *_ in read_with_webdataset(out, "train")}
    assert {"cmyk_1", "grey_1", "png_1", "rgba_1", "tiny_1", "wide_1", f"long_{'x' * 150}_1"} <= keys
    assert {key for key, *_ in read_with_dali(out, "train")} == keys
    assert summary["counts"]["train"] == len(source_labels(quirky_src, "train")) - 4
    assert verify(out) == []


def test_out_folder_of_another_dataset_is_refused(shard_root, digits_src, tmp_path):
    with pytest.raises(DatasetError, match=r"another dataset or settings \(image_size 80 -> 64"):
        build_shards(digits_src, shard_root, image_size=64, shard_size=40, workers=1, show_progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="was not written by this build_shards"):
        build_shards(digits_src, foreign, image_size=SIZE, workers=1, show_progress=False)
    with pytest.raises(DatasetError, match="cannot create out"):
        build_shards(digits_src, foreign / "notes.txt" / "out", image_size=SIZE, workers=1, show_progress=False)
    finished = shutil.copytree(shard_root, tmp_path / "finished", ignore=shutil.ignore_patterns("parts"))
    with pytest.raises(DatasetError, match="holds finished shards but no parts/plan.json"):
        build_shards(digits_src, finished, image_size=SIZE, workers=1, show_progress=False)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"image_size": "abc"}, "image_size='abc' must be an integer >= 1"),
        ({"quality": 101}, "quality=101 must be an integer within 1..100"),
        ({"workers": "all"}, "workers='all' must be an integer >= 1"),
        ({"seed": -1}, "seed=-1 must be an integer >= 0"),
        ({"shard_size": True}, "shard_size=True must be an integer"),
        ({"part": 2, "parts": 2}, "0 <= part < parts"),
        ({"splits": 5}, "splits=5 must be train, val or a list of them"),
        ({"splits": []}, "splits=[] must be train, val or a list of them"),
    ],
)
def test_bad_options_are_one_line_errors_before_any_work(option, message, digits_src, tmp_path):
    with pytest.raises(DatasetError, match=re.escape(message)):
        build_shards(digits_src, tmp_path / "out", show_progress=False, **option)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_without_one_usable_image_is_an_error_that_still_lists_why(split, digits_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(digits_src / "train" / "d0", src / "train" / "n0")  # the other split: real images
    shutil.copytree(digits_src / "val" / "d0", src / "val" / "n0")
    for path in (src / split / "n0").iterdir():
        path.write_bytes(b"not a picture")
    with pytest.raises(DatasetError, match=f"no {split} image could be used: see why in"):
        build_shards(src, tmp_path / "out", workers=1, show_progress=False)
    entries = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert len(entries) == len(list((src / split / "n0").iterdir()))
    assert all(f"/{split}/n0/" in entry["path"] and "not an image" in entry["reason"] for entry in entries)
    assert not (tmp_path / "out" / "meta.json").exists()  # not a dataset that passes for complete


def test_cli_prints_one_line_errors_and_help(tmp_path):
    cwd = tmp_path / "cwd"  # the user's folder: the command must leave nothing in it (no outputs/, no logs)
    cwd.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "preprocess.build_shards", *args]
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)

    result = cli(f"src={tmp_path / 'nowhere'}", f"out={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.startswith("error: src ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    result = cli("--help")
    assert result.returncode == 0 and "image_size: 256" in result.stdout and "shard_size" in result.stdout
    assert not list(cwd.iterdir())


def rewrite_shard(root: Path, split: str, samples: list[Sample], *, update_meta: bool) -> None:
    """Replace the first shard of ``split``; optionally make meta.json agree, so only content checks can tell."""
    path = shard_paths(root, split)[0]
    write_shard(path, samples)
    if update_meta:
        meta = read_meta(root)
        meta["splits"][split]["shards"][0].update(
            bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()
        )
        (root / "meta.json").write_text(json.dumps(meta))


def test_verify_accepts_good_shards_and_catches_tampering(shard_root, tmp_path):
    assert verify(shard_root, workers=2) == []
    root = shutil.copytree(shard_root, tmp_path / "copy")
    samples = [Sample(key, jpeg, cls) for key, cls, _, jpeg in read_with_webdataset(root, "val")[:40]]

    tampered = [*samples[:-1], Sample(samples[-1].key, samples[-1].jpeg, 10)]  # label out of range
    rewrite_shard(root, "val", tampered, update_meta=False)
    problems = verify(root)
    assert any("sha256 differs" in p for p in problems) and any("not one valid index < 10" in p for p in problems)

    small = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    rewrite_shard(root, "val", [*samples[:-1], Sample(samples[-1].key, small, samples[-1].label)], update_meta=True)
    assert [p.split(": ", 1)[1] for p in verify(root)] == ["image decodes to (8, 8, 3), expected (80, 80, 3)"]

    rewrite_shard(root, "val", samples[:-1], update_meta=True)
    assert any("39 samples, meta.json says 40" in p for p in verify(root))

    other = PixelAccumulator(SIZE)  # statistics of other images (the val split's): another dataset's stats.npz
    for *_, jpeg in read_with_webdataset(root, "val"):
        other.add(decode(jpeg))
    other.finalize().save(root)
    assert any("mean_image, mean, cov, eigval, eigvec differ from the statistics" in p for p in verify(root))
    stats = root / "stats.npz"
    stats.write_bytes(stats.read_bytes()[: stats.stat().st_size // 2])
    assert any("stats.npz is damaged" in p for p in verify(root))

    result = run_cli("preprocess.verify", f"out={root}")
    assert result.returncode == 1 and "problem" in result.stderr and "Traceback" not in result.stderr
    assert run_cli("preprocess.verify", f"out={shard_root}").returncode == 0


def test_verify_reports_a_member_without_extension_and_refuses_a_malformed_meta_json(shard_root, tmp_path):
    root = shutil.copytree(shard_root, tmp_path / "copy")
    path = shard_paths(root, "val")[0]
    with tarfile.open(path, "a") as tar:  # a stray member appended: "README", no dot
        info = tarfile.TarInfo("README")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    problems = verify(root)
    assert any(p.endswith(":README: components [''], expected ['cls', 'jpg', 'lbl']") for p in problems), problems
    assert any(".idx: header" in p for p in problems), problems  # and the index no longer matches

    meta = json.loads((root / "meta.json").read_text())
    del meta["splits"]["train"]["shards"][1]["sha256"]
    (root / "meta.json").write_text(json.dumps(meta))
    result = run_cli("preprocess.verify", f"out={root}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "meta.json is not build_shards' meta.json (splits.train.shards[1] without name, count, bytes or sha256)" in (
        result.stderr
    )
    (root / "meta.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"is not build_shards' meta.json \(not a JSON object\)"):
        verify(root)

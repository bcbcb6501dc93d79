"""Shared fixtures: a small tree of real-pixel JPEGs (the digits demo data) and shards built from it.

Sizes are chosen for a 2-core CI machine: 80x80 shards, which the AlexNet geometry accepts with a
64x64 crop (conv1 15x15 -> pool 7 -> pool 3 -> pool 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocess.demo_data import write_digits_tree

SHARD_IMAGE_SIZE = 80
TEST_CROP = 64


@pytest.fixture(scope="session")
def digits_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree (train/val, 10 classes) of 200 real-pixel JPEGs, 48-120 px, varied aspect."""
    root = tmp_path_factory.mktemp("digits-src")
    write_digits_tree(root, limit=200, size_range=(48, 120), seed=0)
    return root


@pytest.fixture(scope="session")
def shard_root(digits_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of ``digits_src`` at 80x80, 40 samples per shard, built by preprocess.build_shards."""
    from preprocess.build_shards import build_shards

    out = tmp_path_factory.mktemp("digits-shards")
    build_shards(src=digits_src, out=out, image_size=SHARD_IMAGE_SIZE, shard_size=40, workers=2, show_progress=False)
    return out

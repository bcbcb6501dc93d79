"""The shared config-value checks (``preprocess.config_values.as_*``) against hand-written cases, the config objects
built on them, and the commands answering a value of the wrong type with one line and exit status 2 before any work."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import DataSpec
from preprocess.config_values import ConfigValueError, as_bool, as_choice, as_float, as_int, as_optional_int
from preprocess.shard_format import DatasetError
from train.checkpoint import REQUIRED_KEYS, save_checkpoint
from train.config import TrainerConfig
from train.evaluate import EvalOptions, mirror_option, writable_out
from train.schedule import check_schedule

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.crop_size=64", "data.batch_size=16", "model.width=0.25", "trainer.progress=false"]


@pytest.mark.parametrize(
    ("value", "low", "high", "expected"),
    [
        (3, None, None, 3),
        (0, 0, None, 0),
        (1e3, 1, None, 1000),
        (4.0, 1, 4, 4),
        ("16", 1, None, 16),
        (" -2 ", None, 0, -2),
    ],
)
def test_as_int_accepts_whole_numbers_and_their_text(value, low, high, expected) -> None:
    result = as_int("k", value, low, high)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    ("value", "low", "high", "message"),
    [
        ("abc", 1, None, "data.k='abc' must be an integer >= 1"),
        (True, None, None, "data.k=True must be an integer"),
        (2.5, None, None, "data.k=2.5 must be an integer"),
        (float("nan"), None, None, "data.k=nan must be an integer"),
        (None, 0, None, "data.k=None must be an integer >= 0"),
        (101, 1, 100, "data.k=101 must be an integer within 1..100"),
        (0, 1, None, "data.k=0 must be an integer >= 1"),
        (6, None, 5, "data.k=6 must be an integer <= 5"),
        ([1], None, None, "data.k=[1] must be an integer"),
    ],
)
def test_as_int_rejects_with_one_line_naming_the_key(value, low, high, message) -> None:
    with pytest.raises(ConfigValueError) as err:
        as_int("data.k", value, low, high)
    assert str(err.value) == message


def test_as_optional_int_lets_null_through_and_says_so() -> None:
    assert as_optional_int("data.threads", None, low=1) is None and as_optional_int("data.threads", 2, low=1) == 2
    with pytest.raises(ConfigValueError, match=r"^data.threads=0 must be an integer >= 1 or null$"):
        as_optional_int("data.threads", 0, low=1)


def test_as_float() -> None:
    assert as_float("k", 1) == 1.0 and as_float("k", "0.5", 0, 1) == 0.5 and as_float("k", 0, low=0) == 0.0
    assert as_float("k", 0.999, 0, 1, high_open=True) == 0.999
    cases = [
        (("x", None, None), {}, "k='x' must be a number"),
        ((False, None, None), {}, "k=False must be a number"),
        ((float("inf"), None, None), {}, "k=inf must be a number"),
        ((-0.1, 0, None), {}, "k=-0.1 must be a number >= 0"),
        ((0, 0, None), {"low_open": True}, "k=0 must be a number > 0"),
        ((0, 0, 1), {"low_open": True}, "k=0 must be a number > 0 and <= 1"),
        ((1.5, 0, 1), {}, "k=1.5 must be a number within 0..1"),
        ((1, 0, 1), {"high_open": True}, "k=1 must be a number >= 0 and < 1"),
        ((1.0, None, 1), {"high_open": True}, "k=1.0 must be a number < 1"),
    ]
    for args, keywords, message in cases:
        with pytest.raises(ConfigValueError) as err:
            as_float("k", *args, **keywords)
        assert str(err.value) == message


def test_as_bool_takes_true_and_false_only() -> None:
    assert as_bool("k", True) is True and as_bool("k", False) is False
    assert as_bool("k", "true") is True and as_bool("k", "FALSE") is False and as_bool("k", " True ") is True
    for value in ("no", "off", "yes", "on", "0", 0, 1, None, ""):
        with pytest.raises(ConfigValueError, match=r"^data.flip=.* must be true or false$"):
            as_bool("data.flip", value)


def test_as_choice() -> None:
    assert as_choice("k", "gpu", ("cpu", "gpu")) == "gpu"
    for value in ("tpu", None, 1, "GPU"):
        with pytest.raises(ConfigValueError, match=r"^trainer.k=.* is not one of cpu\|gpu$"):
            as_choice("trainer.k", value, ("cpu", "gpu"))


def test_the_error_is_a_value_error_and_what_every_command_catches() -> None:
    assert issubclass(ConfigValueError, ValueError) and issubclass(ConfigValueError, DatasetError)


def test_trainer_config_converts_every_key() -> None:
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "trainer" / "default.yaml"))
    assert TrainerConfig.from_mapping(values) == TrainerConfig()
    text = {"devices": "2", "compile": "true", "tencrop": "false", "timeout_s": "30"}
    assert TrainerConfig.from_mapping(text) == TrainerConfig(devices=2, compile=True, tencrop=False, timeout_s=30.0)
    for key, value, message in [
        ("devices", "two", "trainer.devices='two' must be an integer >= 1"),
        ("max_epochs", 0, "trainer.max_epochs=0 must be an integer >= 1"),
        ("seed", -1, "trainer.seed=-1 must be an integer >= 0"),
        ("log_every", 2.5, "trainer.log_every=2.5 must be an integer >= 1"),
        ("accelerator", "tpu", "trainer.accelerator='tpu' is not one of auto|cpu|gpu"),
        ("precision", "fp16", "trainer.precision='fp16' is not one of auto|fp32|bf16"),
        ("channels_last", "no", "trainer.channels_last='no' must be true or false"),
        ("compile", "off", "trainer.compile='off' must be true or false"),
        ("cudnn_benchmark", 1, "trainer.cudnn_benchmark=1 must be true or false"),
        ("tencrop", "no", "trainer.tencrop='no' must be true or false"),
        ("progress", None, "trainer.progress=None must be true or false"),
        ("timeout_s", 0, "trainer.timeout_s=0 must be a number > 0"),
        ("resume", None, "trainer.resume=None must be auto, never or the path of a checkpoint"),
    ]:
        with pytest.raises(ValueError) as err:
            TrainerConfig.from_mapping({key: value})
        assert str(err.value) == message


def test_data_spec_converts_every_key() -> None:
    spec = DataSpec.from_cfg(
        {"root": "/x", "flip": "false", "random_crop": False, "crop_size": "64", "threads": 2, "shuffle_buffer": 0}
    )
    assert (spec.flip, spec.random_crop, spec.crop_size, spec.threads, spec.shuffle_buffer) == (False, False, 64, 2, 0)
    for key, value, message in [
        ("flip", "no", "data.flip='no' must be true or false"),
        ("random_crop", "off", "data.random_crop='off' must be true or false"),
        ("std", "yes", "data.std='yes' must be true or false"),
        ("crop_size", "abc", "data.crop_size='abc' must be an integer >= 1"),
        ("batch_size", 0, "data.batch_size=0 must be an integer >= 1"),
        ("threads", 0, "data.threads=0 must be an integer >= 1 or null"),
        ("shuffle_buffer", -1, "data.shuffle_buffer=-1 must be an integer >= 0"),
        ("prefetch", "x", "data.prefetch='x' must be an integer >= 1"),
        ("loader", "jax", "data.loader='jax' is not one of dali|torch"),
        ("device", "tpu", "data.device='tpu' is not one of auto|gpu|cpu"),
        ("dtype", "int8", "data.dtype='int8' is not one of float32|float16|bfloat16"),
        ("lighting", {"sigma": -1}, "data.lighting.sigma=-1 must be a number >= 0"),
        ("lighting", {"scale": "log"}, "data.lighting.scale='log' is not one of sqrt|unit"),
        ("lighting", 0.1, "data.lighting=0.1 must be a group (sigma, scale) or null"),
    ]:
        with pytest.raises(DatasetError) as err:
            DataSpec.from_cfg({"root": "/x", key: value})
        assert str(err.value) == message


def test_schedule_configs_are_checked_without_an_optimizer() -> None:
    assert check_schedule({"name": "step", "step_epochs": "10"}) == {"name": "step", "step_epochs": 10}
    assert check_schedule(OmegaConf.create({"name": "step", "step_epochs": [30, 60]}))["step_epochs"] == [30, 60]
    for options, message in [
        ({"name": "step", "step_epochs": 0}, "schedule.step_epochs=0 must be an integer >= 1"),
        ({"name": "step", "step_epochs": [30, 0]}, "schedule.step_epochs[1]=0 must be an integer >= 1"),
        ({"name": "plateau", "patience": 0}, "schedule.patience=0 must be an integer >= 1"),
        ({"name": "plateau", "max_reductions": -1}, "schedule.max_reductions=-1 must be an integer >= 0"),
        ({"name": "plateau", "factor": 0}, "schedule.factor=0 must be a number > 0"),
        ({"name": "plateau", "min_delta": -0.1}, "schedule.min_delta=-0.1 must be a number >= 0"),
        ({"name": "cosine", "warmup_epochs": "x"}, "schedule.warmup_epochs='x' must be a number >= 0"),
        ({"name": "cosine", "min_lr_factor": -1}, "schedule.min_lr_factor=-1 must be a number >= 0"),
        ({"name": "linear"}, "schedule.name='linear' is not one of plateau|step|cosine"),
    ]:
        with pytest.raises(ConfigValueError) as err:
            check_schedule(options)
        assert str(err.value) == message


def test_evaluate_options(tmp_path: Path) -> None:
    cfg = {"devices": "2", "batch_size": 64, "tencrop": "false", "mirror": "auto", "timeout_s": 300}
    assert EvalOptions.from_cfg(cfg) == EvalOptions(2, 64, False, "auto", 300.0)
    assert [mirror_option(value) for value in ("auto", True, "false")] == ["auto", True, False]
    for key, value, message in [
        ("devices", "abc", "devices='abc' must be an integer >= 1"),
        ("batch_size", 63, "batch_size=63 must be a positive multiple of devices=2"),
        ("tencrop", "no", "tencrop='no' must be true or false"),
        ("mirror", "maybe", "mirror='maybe' is unknown: use auto, true or false"),
        ("timeout_s", -1, "timeout_s=-1 must be a number > 0"),
    ]:
        with pytest.raises(ValueError) as err:
            EvalOptions.from_cfg({**cfg, key: value})
        assert str(err.value) == message
    assert writable_out(None) is None and writable_out(tmp_path / "a" / "b.json") == tmp_path / "a" / "b.json"
    assert (tmp_path / "a").is_dir() and not list((tmp_path / "a").iterdir())  # the probe file is gone
    (tmp_path / "file").touch()
    with pytest.raises(ValueError, match="part of its folder path is a file"):
        writable_out(tmp_path / "file" / "b.json")
    with pytest.raises(ValueError, match="is a folder"):
        writable_out(tmp_path)


def one_line_exit_2(module: str, *args: str) -> str:
    """Run ``python -m module args``; it must fail with exit status 2 and a single ``error:`` line."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr and not done.stdout.strip(), done.stdout
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.devices=two"], "trainer.devices='two' must be an integer >= 1"),
        (["trainer.devices=2", "data.flip=no"], "data.flip='no' must be true or false"),
        (["schedule=step", "schedule.step_epochs=0"], "schedule.step_epochs=0 must be an integer >= 1"),
    ],
    ids=["devices", "flip", "step-epochs"],
)
def test_train_main_answers_a_bad_value_with_one_line(overrides, message, shard_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"data.root={shard_root}", *SMALL, "trainer.accelerator=cpu", *overrides, f"hydra.run.dir={run_dir}"]
    assert message in one_line_exit_2("train.main", *args)
    assert not (run_dir / "checkpoints").exists()


def test_evaluate_checks_out_before_evaluating(shard_root: Path, tmp_path: Path) -> None:
    """A checkpoint without weights: evaluating it would fail otherwise, so the out= line shows nothing ran."""
    data = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / "imagenet.yaml"))
    data.update(root="/where/it/was/trained", crop_size=64)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, {key: {} for key in REQUIRED_KEYS} | {"config": {"data": data, "model": {}}})
    (tmp_path / "file").touch()
    out = tmp_path / "file" / "eval.json"
    line = one_line_exit_2("train.evaluate", f"checkpoint={checkpoint}", f"data.root={shard_root}", f"out={out}")
    assert line == f"error: out={out} cannot be written (part of its folder path is a file): choose another out="


def test_preview_answers_a_bad_switch_with_one_line(shard_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview"
    line = one_line_exit_2("pipeline.preview", f"data.root={shard_root}", "data.random_crop=off", f"out={out}")
    assert line == "error: data.random_crop='off' must be true or false" and not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["n=5000"], "n=5000 is more than the 160 train images of"),
        ([f"out={REPO / 'README.md'}/preview"], "cannot hold the preview (Not a directory): choose another out="),
        (["data.crop_size=96"], "use data.crop_size=80 or less, or shards built with image_size=96 or more"),
    ],
    ids=["n", "out", "crop"],
)
def test_preview_names_the_option_to_change(shard_root: Path, tmp_path: Path, args: list, message: str) -> None:
    args = [f"data.root={shard_root}", "data.crop_size=64", f"out={tmp_path / 'p'}", *args]
    assert message in one_line_exit_2("pipeline.preview", *args)


def test_a_ctrl_c_no_command_handles_is_one_line_and_exit_130() -> None:
    driver = "from preprocess.cli import run_cli\ndef main():\n    raise KeyboardInterrupt\nrun_cli(main)"
    result = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and result.stderr == "interrupted (Ctrl-C)\n"


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("preprocess.build_shards", ["src=x", "out=y", "image_sise=64"], "unknown key 'image_sise': --help lists"),
        ("preprocess.build_shards", ["src=x", "out=y", "+image_sise=64"], "unknown key 'image_sise': --help lists"),
        ("train.main", ["data.root=x", "trainer.fast=1"], "unknown key 'trainer.fast': --help lists"),
        ("preprocess.verify", ["out=/no/such/folder"], "data folder /no/such/folder does not exist"),
    ],
    ids=["typo", "typo-appended", "trainer-typo", "verify-no-folder"],
)
def test_a_typo_is_named_not_answered_with_hydras_append_advice(module: str, args: list, message: str) -> None:
    line = one_line_exit_2(module, *args)
    assert message in line and "To append to your config" not in line


def test_a_sweeper_plugin_that_is_not_installed_names_its_extra() -> None:
    try:
        importlib.import_module("hydra_plugins.hydra_optuna_sweeper")
        pytest.skip("the optuna extra is installed here")
    except ImportError:
        pass
    line = one_line_exit_2("train.main", "-m", "hydra/sweeper=optuna_lr", "data.root=x")
    assert line.endswith("a plugin that is not installed; pip install -e '.[optuna]'") and "search path" not in line

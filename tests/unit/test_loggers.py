"""Metric loggers: TensorBoard by default, wandb and swanlab when ``run.loggers`` names them, fanned out together.

wandb and swanlab are optional packages. Their code paths are exercised here through stand-in modules placed in
``sys.modules`` (what the logger passes to ``init`` and ``log``), so they are tested where the packages are absent;
the tests that write real offline run files skip with a reason when the package is not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gsrl.config import ConfigError, RunConfig, load_config
from gsrl.loggers import (
    LoggerUnavailableError,
    MetricLogger,
    MultiLogger,
    SwanLabLogger,
    TensorBoardLogger,
    WandbLogger,
    build_loggers,
)
from gsrl.metrics import ScalarLog


class RecordingLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.calls.append((step, dict(scalars)))

    def close(self) -> None:
        self.closed = True


class BrokenLogger(RecordingLogger):
    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        raise OSError("disk full")


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_multi_logger_fans_out_to_every_logger() -> None:
    first, second = RecordingLogger(), RecordingLogger()
    multi = MultiLogger([first, second])
    assert isinstance(multi, MetricLogger) and isinstance(first, MetricLogger)
    multi.log(1, {"actor/loss": 0.5})
    multi.log(2, {"actor/loss": 0.25, "env/success_once": 1.0})
    multi.close()
    expected = [(1, {"actor/loss": 0.5}), (2, {"actor/loss": 0.25, "env/success_once": 1.0})]
    assert first.calls == second.calls == expected
    assert first.closed and second.closed


def test_a_failing_backend_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    good = RecordingLogger()
    multi = MultiLogger([BrokenLogger(), good])
    with caplog.at_level(logging.WARNING, logger="gsrl.loggers"):
        multi.log(1, {"actor/loss": 1.0})
        multi.log(2, {"actor/loss": 2.0})
        multi.close()
    assert [step for step, _ in good.calls] == [1, 2] and good.closed
    # Warned once for logging (not once per update) and once for closing.
    assert [r.getMessage() for r in caplog.records].count("BrokenLogger failed to log step 1: disk full") == 1
    assert not any("step 2" in r.getMessage() for r in caplog.records)
    assert any("failed to close" in r.getMessage() for r in caplog.records)


def test_tensorboard_files_hold_the_scalars(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log(1, {"actor/loss": 0.5, "env/success_once": 0.0})
    logger.log(2, {"actor/loss": 0.25, "env/success_once": 1.0})
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert read_scalars(tmp_path / "tb") == {
        "actor/loss": [(1, 0.5), (2, 0.25)],
        "env/success_once": [(1, 0.0), (2, 1.0)],
    }


def test_build_loggers_defaults_to_tensorboard_under_the_run_directory(tmp_path: Path) -> None:
    loggers = build_loggers(RunConfig(), tmp_path)
    assert [type(logger) for logger in loggers.loggers] == [TensorBoardLogger]
    loggers.log(7, {"throughput/samples_per_s": 123.0})
    loggers.close()
    assert read_scalars(tmp_path / "tensorboard") == {"throughput/samples_per_s": [(7, 123.0)]}
    assert build_loggers(RunConfig(loggers=()), tmp_path / "none").loggers == []


def test_scalar_log_keeps_its_old_api_over_tensorboard_logger(tmp_path: Path) -> None:
    scalars = ScalarLog(tmp_path)
    scalars.log({"actor/loss": 3.0}, 5)
    scalars.close()
    assert read_scalars(tmp_path) == {"actor/loss": [(5, 3.0)]}
    ScalarLog(None).log({"actor/loss": 1.0}, 1)  # non-zero ranks: writes nothing, raises nothing


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("run.loggers=[tensorboard, mlflow]", "run.loggers", "unknown logger(s) ['mlflow']"),
        ("run.loggers=[wandb, wandb]", "run.loggers", "twice"),
        ("run.logger_mode=cloud", "run.logger_mode", "offline"),
        ("run.wandb_project=''", "run.wandb_project", "empty"),
    ],
)
def test_config_refuses_unknown_loggers_and_modes(override: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        load_config(None, [override])
    assert exc_info.value.key == key
    assert message in str(exc_info.value)
    if "unknown" in message:
        assert "tensorboard" in str(exc_info.value) and "swanlab" in str(exc_info.value)  # the known names


def test_config_accepts_every_known_logger() -> None:
    run = load_config(None, ["run.loggers=[tensorboard, wandb, swanlab]", "run.logger_mode=online"]).run
    assert run.loggers == ("tensorboard", "wandb", "swanlab") and run.logger_mode == "online"
    assert load_config().run.loggers == ("tensorboard",) and load_config().run.logger_mode == "offline"


@pytest.mark.parametrize("name", ["wandb", "swanlab"])
def test_missing_package_is_a_clear_error_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # what an uninstalled package looks like to import
    with pytest.raises(LoggerUnavailableError, match=f"pip install {name}") as exc_info:
        build_loggers(RunConfig(loggers=("tensorboard", name)), tmp_path)
    assert f"run.loggers includes '{name}'" in str(exc_info.value)
    assert not (tmp_path / "tensorboard").exists()  # checked before the TensorBoard writer started


class FakeRun:
    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def log(self, data: dict[str, float], step: int) -> None:
        self.calls.append(("log", (data, step)))

    def finish(self) -> None:
        self.calls.append(("finish", None))


def fake_module(name: str, calls: list[tuple[str, Any]]) -> types.ModuleType:
    module = types.ModuleType(name)

    def init(**kwargs: Any) -> FakeRun:
        calls.append(("init", kwargs))
        return FakeRun(calls)

    module.init = init  # type: ignore[attr-defined]
    module.finish = lambda: calls.append(("module.finish", None))  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize(("mode", "expected_mode"), [("offline", "offline"), ("online", "online")])
def test_wandb_logger_passes_mode_dir_and_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, expected_mode: str
) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", calls))
    run = RunConfig(name="r1", loggers=("wandb",), wandb_project="proj", logger_mode=mode)
    loggers = build_loggers(run, tmp_path / "run", config={"algo": {"lr": 0.1}})
    loggers.log(3, {"actor/loss": 1})
    loggers.close()
    (_, init), log_call, finish = calls
    assert init == {
        "project": "proj",
        "name": "r1",
        "dir": str(tmp_path / "run"),
        "mode": expected_mode,
        "config": {"algo": {"lr": 0.1}},
    }
    assert (tmp_path / "run").is_dir()
    assert log_call == ("log", ({"actor/loss": 1.0}, 3)) and finish == ("finish", None)


@pytest.mark.parametrize(("mode", "expected_mode"), [("offline", "offline"), ("online", "cloud")])
def test_swanlab_logger_passes_mode_logdir_and_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, expected_mode: str
) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setitem(sys.modules, "swanlab", fake_module("swanlab", calls))
    logger = SwanLabLogger("proj", "r1", tmp_path, mode)
    logger.log(4, {"env/success_once": 0.5})
    logger.close()
    (_, init), log_call, finish = calls
    assert init["mode"] == expected_mode and init["experiment_name"] == "r1" and init["project"] == "proj"
    assert init["logdir"] == str(tmp_path / "swanlog") and (tmp_path / "swanlog").is_dir()
    assert log_call == ("log", ({"env/success_once": 0.5}, 4)) and finish == ("module.finish", None)


def test_fan_out_to_tensorboard_and_wandb_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", calls))
    loggers = build_loggers(RunConfig(loggers=("tensorboard", "wandb")), tmp_path)
    loggers.log(1, {"actor/loss": 0.5})
    loggers.close()
    assert read_scalars(tmp_path / "tensorboard") == {"actor/loss": [(1, 0.5)]}
    assert ("log", ({"actor/loss": 0.5}, 1)) in calls


def not_installed(package: str) -> pytest.MarkDecorator:
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(missing, reason=f"{package} is not installed (pip install {package})")


@not_installed("wandb")
def test_wandb_offline_writes_its_run_files_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger("gsrl-test", "offline-check", tmp_path, "offline", config={"run": {"seed": 0}})
    logger.log(1, {"actor/loss": 0.5})
    logger.log(2, {"actor/loss": 0.25})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((tmp_path / "wandb").rglob("*"))


@not_installed("swanlab")
def test_swanlab_offline_writes_its_run_files_locally(tmp_path: Path) -> None:
    logger = SwanLabLogger("gsrl-test", "offline-check", tmp_path, "offline")
    logger.log(1, {"actor/loss": 0.5})
    logger.close()
    runs = list((tmp_path / "swanlog").glob("run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.swanlab")), list((tmp_path / "swanlog").rglob("*"))

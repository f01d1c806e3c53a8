"""Where the learner's scalars go: TensorBoard by default, Weights & Biases and SwanLab when the config asks.

``run.loggers`` names the backends (``tensorboard``, ``wandb``, ``swanlab``); ``build_loggers`` makes one
``MetricLogger`` that fans every ``log(step, scalars)`` out to all of them, under the same RLinf names
(``actor/loss``, ``env/success_once``, ...) so a run reads the same in every tool.

wandb and swanlab are optional packages: they are imported only when chosen, and a missing one is a
``LoggerUnavailableError`` that says which ``pip install`` fixes it, raised when the learner starts rather than
after the first update. ``run.logger_mode: offline`` (the default) keeps both off the network: their run files
are written under the run directory and can be uploaded later (``wandb sync``, ``swanlab sync``), which is
what a cluster without egress or a CI machine needs.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from gsrl.config import RunConfig

log = logging.getLogger(__name__)

# Logger name -> the pip package that provides it (the import name is the same for both).
OPTIONAL_PACKAGES = {"wandb": "wandb", "swanlab": "swanlab"}


class LoggerUnavailableError(RuntimeError):
    """A logger chosen in ``run.loggers`` cannot be used (its package is not installed)."""


@runtime_checkable
class MetricLogger(Protocol):
    """A sink for scalar metrics, one dict per learner update."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` (name -> value) at ``step`` (the learner's update count)."""
        ...

    def close(self) -> None:
        """Flush and release files or background processes; the logger is not used afterwards."""
        ...


def import_optional(name: str) -> ModuleType:
    """Import the optional package of logger ``name``, or raise ``LoggerUnavailableError`` naming the pip package."""
    package = OPTIONAL_PACKAGES[name]
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise LoggerUnavailableError(
            f"run.loggers includes '{name}' but the {package} package is not installed: pip install {package} "
            f"(or remove '{name}' from run.loggers)"
        ) from exc


class TensorBoardLogger:
    """Scalars as TensorBoard event files in ``log_dir`` (``<run dir>/tensorboard``), flushed every 10 s."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is a hard dependency, but a slow import

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=10)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, float(value), global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run; offline mode writes ``<run dir>/wandb/offline-run-*`` and never opens a connection."""

    def __init__(
        self,
        project: str,
        name: str,
        run_dir: str | Path,
        mode: str = "offline",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        wandb = import_optional("wandb")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # wandb wants its dir to exist; it adds wandb/ beneath
        self.run = wandb.init(
            project=project, name=name, dir=str(run_dir), mode=mode, config=dict(config) if config else None
        )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({name: float(value) for name, value in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class SwanLabLogger:
    """A SwanLab experiment; offline mode (SwanLab >= 0.6) writes under ``<run dir>/swanlog`` with no network."""

    def __init__(
        self,
        project: str,
        name: str,
        run_dir: str | Path,
        mode: str = "offline",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self._swanlab = import_optional("swanlab")
        logdir = Path(run_dir) / "swanlog"
        logdir.mkdir(parents=True, exist_ok=True)  # swanlab requires logdir to exist
        # SwanLab calls online mode "cloud"; "local" would also need the swanlab[dashboard] extra.
        self.run = self._swanlab.init(
            project=project,
            experiment_name=name,
            logdir=str(logdir),
            mode="cloud" if mode == "online" else "offline",
            config=dict(config) if config else None,
        )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({name: float(value) for name, value in scalars.items()}, step=step)

    def close(self) -> None:
        self._swanlab.finish()


class MultiLogger:
    """Fans each call out to several loggers (possibly none: a silent logger for non-zero learner ranks).

    A backend that fails (a full disk, a wandb service that died) is reported once and then skipped on later
    failures at debug level, so a side channel never stops training and the other backends keep their data.
    """

    def __init__(self, loggers: Sequence[MetricLogger] = ()) -> None:
        self.loggers = list(loggers)
        self._failed: set[int] = set()

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for i, logger in enumerate(self.loggers):
            try:
                logger.log(step, scalars)
            except Exception as exc:  # any backend error: keep the others and the run going
                level = logging.DEBUG if i in self._failed else logging.WARNING
                log.log(level, "%s failed to log step %d: %s", type(logger).__name__, step, exc)
                self._failed.add(i)

    def close(self) -> None:
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # close the rest regardless
                log.warning("%s failed to close: %s", type(logger).__name__, exc)


def build_loggers(run: RunConfig, run_dir: str | Path, config: Mapping[str, Any] | None = None) -> MultiLogger:
    """The loggers ``run.loggers`` names, writing under ``run_dir``; ``config`` (the run's effective config as a
    dict) is stored with wandb and swanlab runs so a dashboard shows what ran.

    All optional packages are checked before any backend starts, so a missing one does not leave a half-made
    TensorBoard directory or wandb run behind.
    """
    for name in run.loggers:
        if name in OPTIONAL_PACKAGES:
            import_optional(name)
    run_dir = Path(run_dir)
    loggers: list[MetricLogger] = []
    try:
        for name in run.loggers:
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
            elif name == "wandb":
                loggers.append(WandbLogger(run.wandb_project, run.name, run_dir, run.logger_mode, config))
            elif name == "swanlab":
                loggers.append(SwanLabLogger(run.wandb_project, run.name, run_dir, run.logger_mode, config))
            else:  # config validation refuses unknown names; this guards direct callers
                raise ValueError(f"unknown logger {name!r} in run.loggers")
    except BaseException:
        MultiLogger(loggers).close()
        raise
    return MultiLogger(loggers)

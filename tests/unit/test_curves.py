"""``gsrl curve``: reads what the learner's TensorBoard logger wrote and ``gsrl eval --json`` reports, draws a PNG."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from gsrl.cli import main as gsrl_main
from gsrl.curves import SUCCESS_TAG, CurveError, eval_positions, read_eval, read_scalars, smooth
from gsrl.loggers import TensorBoardLogger
from services.env_server.evaluate import wilson_interval


def _run_dir(tmp_path: Path, updates: int = 30) -> Path:
    run = tmp_path / "run"
    logger = TensorBoardLogger(run / "tensorboard")  # what the learner writes
    for step in range(1, updates + 1):
        logger.log(step, {SUCCESS_TAG: step / updates, "env/return": 2.0 * step, "actor/loss": 0.1})
    logger.close()
    return run


def _eval_report(path: Path, successes: int, episodes: int, checkpoint: str = "runs/sft/model.safetensors") -> Path:
    low, high = wilson_interval(successes, episodes)
    result = {"episodes": episodes, "success_once_rate": successes / episodes, "mean_return": 1.0}
    path.write_text(json.dumps({"result": result, "success_once_ci95": [low, high], "checkpoint": checkpoint}))
    return path


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_reads_back_what_the_tensorboard_logger_wrote(tmp_path: Path) -> None:
    series = read_scalars(_run_dir(tmp_path, updates=30), (SUCCESS_TAG, "env/return", "missing/tag"))
    assert set(series) == {SUCCESS_TAG, "env/return"}
    assert series[SUCCESS_TAG].steps == tuple(range(1, 31))
    assert series["env/return"].values[-1] == pytest.approx(60.0)
    assert series[SUCCESS_TAG].values[0] == pytest.approx(1 / 30)


def test_smooth_is_a_trailing_mean_that_skips_nans() -> None:
    assert smooth([1.0, 3.0, float("nan"), 5.0], 2) == [1.0, 2.0, 3.0, 5.0]


def test_gsrl_curve_writes_a_png_with_eval_points(tmp_path: Path, capsys) -> None:
    run = _run_dir(tmp_path)
    sft = _eval_report(tmp_path / "sft.json", 40, 100)
    rl = _eval_report(tmp_path / "rl.json", 85, 100)
    out = tmp_path / "img" / "curve.png"
    assert gsrl_main(["curve", str(run), "--out", str(out), "--eval", f"SFT={sft}", "--eval", f"RL={rl}"]) == 0
    width, height = _png_size(out)
    assert width > 400 and height > 300
    assert "30 points" in capsys.readouterr().out
    point = read_eval("RL", rl)
    assert point.low < point.success == 0.85 < point.high and point.episodes == 100


def test_bad_inputs_name_the_problem(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CurveError, match="no TensorBoard event files"):
        read_scalars(empty, (SUCCESS_TAG,))
    (tmp_path / "bad.json").write_text('{"result": {}}')
    with pytest.raises(CurveError, match="not a `gsrl eval --json` report"):
        read_eval("x", tmp_path / "bad.json")
    run = _run_dir(tmp_path)
    assert gsrl_main(["curve", str(run), "--out", str(tmp_path / "c.png"), "--eval", "no-equals-sign"]) == 2
    assert "expected LABEL=PATH" in capsys.readouterr().err


def test_evaluated_training_checkpoints_sit_at_their_update(tmp_path: Path) -> None:
    """SFT at the start, PPO checkpoints at their updates (a mid-run peak shows), an unnumbered one at the end."""
    sft = read_eval("SFT", _eval_report(tmp_path / "sft.json", 20, 100))
    mid = read_eval(
        "RL", _eval_report(tmp_path / "u20.json", 30, 100, "runs/rl/checkpoints/update_000020/model.safetensors")
    )
    other = read_eval("other", _eval_report(tmp_path / "other.json", 25, 100, "/elsewhere/model.safetensors"))
    assert (sft.update, mid.update, other.update) == (None, 20, None)
    assert eval_positions([sft, mid, other], last_step=57) == [0, 20, 57]
    assert eval_positions([other], last_step=57) == [57]  # a lone report marks the end
    run = _run_dir(tmp_path)
    args = ["curve", str(run), "--out", str(tmp_path / "c.png"), "--eval", f"SFT={tmp_path / 'sft.json'}"]
    assert gsrl_main([*args, "--eval", f"RL u20={tmp_path / 'u20.json'}"]) == 0

"""``bench.vla_profile`` on the tiny preset on the CPU: every case is profiled and reported (the GPU run's figures
are in docs/benchmarks.md; here only that the tool measures what it says, never a speed)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.vla_profile import main, run


def test_profiles_act_per_batch_and_an_sft_step() -> None:
    results = run("tiny", torch.device("cpu"), [1, 3], train_batch=2, calls=1)
    assert [(r.case, r.batch) for r in results] == [("act", 1), ("act", 3), ("sft step (fwd+bwd)", 2)]
    for r in results:
        assert r.wall_ms > 0 and r.ops_per_call > 50  # a transformer forward dispatches many aten ops
        assert r.kernels_per_call == 0 and r.device_busy_fraction == 0  # no device on a CPU run
        assert r.top_cpu_ops and all(op.startswith("aten::") and ms >= 0 for op, ms in r.top_cpu_ops)
    # The op count of a decision does not grow with the batch: why a launch-bound forward costs the same at batch 64.
    assert results[1].ops_per_call == pytest.approx(results[0].ops_per_call, rel=0.02)


def test_cli_writes_json_and_rejects_bad_batches(tmp_path, capsys) -> None:
    out = tmp_path / "profile.json"
    assert main(["--preset", "tiny", "--device", "cpu", "--batches", "2", "--train-batch", "0", "--calls", "1",
                 "--json", str(out)]) == 0  # fmt: skip
    figures = json.loads(out.read_text())
    assert [f["case"] for f in figures] == ["act"] and figures[0]["batch"] == 2
    assert "VLA tiny on cpu" in capsys.readouterr().out
    try:
        main(["--preset", "tiny", "--batches", "two"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("a non-integer --batches was accepted")

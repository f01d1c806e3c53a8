"""The bench's weight-broadcast stage (``bench/weights.py``) on gloo: both peer protocols, and no silent hang.

Over NCCL the peers post each baseline receive only on the bench's ``go`` (two communicators on one GPU must not
have work in flight at once, see ``bench/weights.py``); that protocol runs here over gloo so a CPU box covers it. A
peer that never answers must turn into a skipped row naming the phase, within the step timeout.
"""

from __future__ import annotations

import math
import time

import pytest

import bench.weights as weights
from bench.__main__ import run_stage
from bench.common import SIZES


def _check_rows(rows: list) -> None:
    assert len(rows) == 3
    for row in rows:
        assert row.skipped is None, row.skipped
        for value in (row.gsrl, row.baseline, row.ratio):
            assert value is not None and math.isfinite(value) and value > 0
    assert "GB/s of payload" in rows[0].note


@pytest.mark.parametrize("on_go", [False, True], ids=["gloo-ahead", "nccl-protocol-on-go"])
def test_weights_stage_delivers_with_either_peer_protocol(monkeypatch: pytest.MonkeyPatch, on_go: bool) -> None:
    monkeypatch.setattr(weights, "serialized", lambda backend: on_go)
    _check_rows(weights.run(SIZES["smoke"]))


def test_a_silent_peer_becomes_a_skipped_row_naming_the_phase(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(weights, "serialized", lambda backend: True)
    monkeypatch.setattr(weights, "STEP_TIMEOUT_S", 3.0)
    monkeypatch.setattr(weights._Peers, "go", lambda self, round_index: None)  # the peers never hear go
    start = time.monotonic()
    rows = run_stage("weights", SIZES["smoke"])
    assert time.monotonic() - start < 60
    assert len(rows) == 1 and rows[0].skipped is not None
    assert rows[0].skipped.startswith("TimeoutError: warm-up flat broadcast"), rows[0].skipped
    assert "arming the peers" in rows[0].skipped and "sent nothing in 3 s" in rows[0].skipped
    out = capsys.readouterr().out
    assert "bench: weights: warm-up: one flat broadcast" in out and "bench: weights: stopping the peers" in out

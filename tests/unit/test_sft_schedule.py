"""The SFT learning-rate schedule: warm-up, cosine decay to 10 %, and the wall-clock budget's share of it."""

from __future__ import annotations

import pytest

from services.learner.sft import SFTSettings, learning_rate


def test_warm_up_then_cosine_down_to_a_tenth() -> None:
    settings = SFTSettings(lr=1.0, warmup_steps=10, steps=110)
    assert learning_rate(0, settings) == pytest.approx(0.1)
    assert learning_rate(9, settings) == pytest.approx(1.0)
    assert learning_rate(10, settings) == pytest.approx(1.0)
    assert learning_rate(60, settings) == pytest.approx(0.55)  # half-way through the decay
    assert learning_rate(110, settings) == pytest.approx(0.1)


def test_the_clock_drives_the_decay_when_it_is_further_along_than_the_steps() -> None:
    settings = SFTSettings(lr=1.0, warmup_steps=0, steps=1000, max_seconds=100.0)
    # 10 % of the steps but half the time gone: the rate is the schedule's half-way value.
    assert learning_rate(100, settings, elapsed_s=50.0) == pytest.approx(0.55)
    # The budget spent: the floor, although most steps remain.
    assert learning_rate(100, settings, elapsed_s=100.0) == pytest.approx(0.1)
    assert learning_rate(100, settings, elapsed_s=250.0) == pytest.approx(0.1)
    # Steps ahead of the clock: the steps decide, as without a budget.
    assert learning_rate(500, settings, elapsed_s=1.0) == pytest.approx(
        learning_rate(500, SFTSettings(lr=1.0, steps=1000))
    )


def test_without_a_budget_the_clock_is_ignored() -> None:
    settings = SFTSettings(lr=1.0, warmup_steps=0, steps=1000)
    assert learning_rate(0, settings, elapsed_s=1e9) == pytest.approx(1.0)

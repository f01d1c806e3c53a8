"""The `gsrl` command line: help text, unknown commands, and config errors that name the key."""

from __future__ import annotations

import argparse

import pytest

from gsrl.cli import COMMANDS, add_config_arguments, main, parse_role_arguments


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_no_arguments_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: gsrl" in capsys.readouterr().out


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_config_prints_effective_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "-c", "state_ppo", "algo.clip_ratio=0.3"]) == 0
    out = capsys.readouterr().out
    assert "clip_ratio: 0.3" in out and "segments_per_update: 16" in out


def test_config_error_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "learner.zero_stag=2"]) == 2
    err = capsys.readouterr().err
    assert "'learner.zero_stag'" in err and "did you mean 'learner.zero_stage'" in err


def test_role_commands_reject_bad_config_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["policy-server", "policy_server.max_batch_size=0"])
    assert exit_info.value.code == 2
    assert "'policy_server.max_batch_size'" in capsys.readouterr().err


def test_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "-c", "no_such_preset"]) == 2
    err = capsys.readouterr().err
    assert "presets: " in err and "state_ppo" in err and "gs_ppo" in err


def test_overrides_may_come_in_runs_between_options() -> None:
    """Scripts prepend common overrides and append per-call ones (the GPU campaign's evals): both runs count."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    parser.add_argument("--episodes", type=int, default=1)
    args, config = parse_role_arguments(parser, ["algo.gamma=0.9", "--episodes", "3", "task.layout_pool=4"], "test")
    assert args.episodes == 3
    assert (config.algo.gamma, config.task.layout_pool) == (pytest.approx(0.9), 4)

"""``bench.gpu_roles``: nvidia-smi pmon rows -> SM % per gsrl role. nvidia-smi itself exists only on the GPU host,
so these tests feed it recorded pmon output (the format of driver 5xx) and check the parsing and the arithmetic."""

from __future__ import annotations

import pytest

from bench.gpu_roles import parse_pmon, role_of, summarize

PMON = """\
# gpu         pid   type     sm    mem    enc    dec    jpg    ofa    command
# Idx           #    C/G      %      %      %      %      %      %    name
    0       1111     C     40     10      -      -      -      -    python3
    0       2222     C     15      2      -      -      -      -    python3
    1       3333     C     70     30      -      -      -      -    python3
    1          -     -      -      -      -      -      -      -    -
"""
ROLES = {1111: "learner", 2222: "env_server", 3333: "learner"}


def test_parse_pmon_keeps_process_rows_only() -> None:
    assert parse_pmon(PMON.splitlines()) == [(0, 1111, 40.0, 10.0), (0, 2222, 15.0, 2.0), (1, 3333, 70.0, 30.0)]


def test_summarize_adds_a_roles_processes_across_gpus_and_averages_over_samples() -> None:
    first = parse_pmon(PMON.splitlines())
    second = [(0, 1111, 20.0, 5.0)]  # the env server was idle in the second sample: it counts as 0 there
    summary = summarize([first, second], ROLES.__getitem__)
    learner = summary["learner"]
    assert learner == {"sm_percent_mean": pytest.approx((110 + 20) / 2), "sm_percent_max": 110, "processes": 2}
    assert summary["env_server"]["sm_percent_mean"] == pytest.approx(7.5)


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        ("/usr/bin/python3 -m services.env_server --config run/config.yaml --index 0", "env_server"),
        ("python3 -m services.policy_server --config c.yaml --id policy-0", "policy_server"),
        ("/opt/venv/bin/python -m services.learner --config c.yaml", "learner"),
        ("python3 -m gsrl.cli learner -c x", "learner"),
        ("python3 train.py", "other"),
    ],
)
def test_role_of_a_command_line(cmdline: str, role: str) -> None:
    assert role_of(cmdline) == role

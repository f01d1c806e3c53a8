"""``gsrl collect --noise``: DART collection runs the noisy action and records the expert's clean one (or, with
``--label executed``, the noisy one). On the state task, so no splat rendering: a few seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gsrl.collect import main as collect_main
from gsrl.data.lerobot import LeRobotDataset
from gsrl.tasks.expert import ExpertAction, PutCubeOnPlateExpert

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]


@pytest.mark.parametrize("label", ["expert", "executed"])
def test_collect_with_noise_records_the_chosen_action(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], label: str
) -> None:
    steps: list[ExpertAction] = []
    act = PutCubeOnPlateExpert.act

    def spy(self: PutCubeOnPlateExpert, env: object) -> ExpertAction:
        steps.append(act(self, env))
        return steps[-1]

    monkeypatch.setattr(PutCubeOnPlateExpert, "act", spy)
    data = tmp_path / "demos"
    # One env and every episode kept: the dataset's frames are exactly the expert's steps, in order.
    argv = ["-c", "state_ppo", "--episodes", "2", "--num-envs", "1", "--no-only-success", "--max-attempts", "2"]
    rc = collect_main([*argv, "--noise", "0.05", "--label", label, "--seed", "0", "--out", str(data)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "expert success rate" in out and f"noise std 0.05, label {label}" in out

    dataset = LeRobotDataset(data)
    assert dataset.num_episodes == 2
    recorded = np.concatenate([dataset.episode(i).actions for i in range(2)])
    assert len(recorded) == len(steps)
    clean = np.stack([s.expert for s in steps])
    executed = np.stack([s.executed for s in steps])
    assert not np.allclose(clean[:, :6], executed[:, :6])  # the env ran perturbed actions
    np.testing.assert_array_equal(clean[:, 6], executed[:, 6])  # gripper never noised
    np.testing.assert_array_equal(recorded, clean if label == "expert" else executed)

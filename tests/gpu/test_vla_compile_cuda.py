"""``VLAPolicy(compile_mode=...)`` on CUDA: both compile modes against eager, in serving and in a training step.

Skipped (with the reason) where CUDA is absent, as in CI. The GPU campaign (``scripts/gpu_campaign.sh``) runs
``tests/gpu`` first; a run may then turn ``policy.compile_mode`` on, which made a ``small`` decision 2.1-2.9x faster
on an H100. Uses a depth-1 ``tiny`` model in float32 (no autocast) so eager and compiled agree to float tolerance.
"""

from __future__ import annotations

import pytest
import torch

from gsrl.policy import build_policy
from gsrl.policy.vla.policy import EXTRA_CHAIN, EXTRA_STOCHASTIC, VLAPolicy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

CAMERA, QPOS = "rgb/3rd_view_camera", "agent/qpos"
SPEC = {CAMERA: ((32, 32, 3), "uint8"), QPOS: ((9,), "float32")}
ACTION_DIM, CHUNK = 7, 5
SHALLOW = {key: {"depth": 1} for key in ("vision", "language", "expert")}


def _policy(compile_mode: str = "") -> VLAPolicy:
    torch.manual_seed(0)
    policy = build_policy(
        "vla",
        SPEC,
        action_dim=ACTION_DIM,
        action_chunk=CHUNK,
        preset="tiny",
        num_denoise_steps=4,
        config_overrides=SHALLOW,
        bf16_autocast=False,
        compile_mode=compile_mode,
    )
    assert isinstance(policy, VLAPolicy)
    return policy.cuda()


def _obs(batch: int, seed: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    gen = torch.Generator().manual_seed(seed)
    obs = {
        CAMERA: torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=gen).cuda(),
        QPOS: (torch.rand(batch, 9, generator=gen) * 2 - 1).cuda(),
    }
    return obs, ["put the cube on the plate"] * batch


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_policy_serves_and_trains_like_eager(mode: str) -> None:
    eager, compiled = _policy(), _policy(mode)
    compiled.load_state_dict(eager.state_dict())
    eager.eval()
    compiled.eval()
    for batch, seed in ((3, 1), (4, 2), (3, 3)):  # one bucket, three calls: graph outputs must not be overwritten
        obs, instructions = _obs(batch, seed)
        outs = []
        for policy in (eager, compiled):
            torch.manual_seed(seed)
            outs.append(policy.act(obs, instructions))
        for name in ("action_chunk", "logprobs", "values"):
            torch.testing.assert_close(getattr(outs[1], name), getattr(outs[0], name), atol=1e-4, rtol=1e-4)
        assert torch.equal(outs[0].extras[EXTRA_STOCHASTIC], outs[1].extras[EXTRA_STOCHASTIC])
    # A PPO-style recompute with backward, twice (the second replays the captured graphs).
    obs, instructions = _obs(8, 5)
    torch.manual_seed(5)
    rollout = eager.act(obs, instructions)
    extras = {EXTRA_CHAIN: rollout.extras[EXTRA_CHAIN], EXTRA_STOCHASTIC: rollout.extras[EXTRA_STOCHASTIC]}
    grads = []
    for policy in (eager, compiled, compiled):
        policy.train()
        policy.zero_grad(set_to_none=True)
        logp, _, values = policy.evaluate_actions(obs, rollout.action_chunk, instructions, extras)
        torch.testing.assert_close(logp, rollout.logprobs, atol=1e-3, rtol=1e-4)
        (logp.mean() + values.mean()).backward()
        grads.append(policy.model.action_in_proj.weight.grad.detach().clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-4, rtol=1e-3)

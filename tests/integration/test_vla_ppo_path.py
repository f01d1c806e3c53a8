"""The tiny VLA through the real training path: the policy server's batcher and segment assembly keep the flow
policy's denoising chain (``extras``), the segment survives the Redis wire format, and the learner's PPO update
recomputes the rollout's log-probabilities from it (ratio 1 for unchanged weights) for Flow-SDE and Flow-Noise."""

from __future__ import annotations

import pytest
import torch

from gsrl.config import AlgoConfig, load_config
from gsrl.policy import build_policy
from gsrl.stream import segment_from_proto, segment_to_proto
from services.learner.core import PPOLearnerCore, TorchEngine, build_rollout_batch
from services.policy_server.core import InferenceBatcher, InferenceRequest, PolicyHost, SegmentAssembler, StepOutcome

CAMERA = "rgb/3rd_view_camera"
SPEC = {CAMERA: ((32, 32, 3), "uint8"), "state": ((25,), "float32")}
NUM_ENVS, STEPS, CHUNK, ACTION_DIM = 2, 4, 2, 7
INSTRUCTION = "pick up the cube and put it on the plate"


def _observations(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        CAMERA: torch.randint(0, 256, (NUM_ENVS, 32, 32, 3), dtype=torch.uint8, generator=gen),
        "state": torch.rand(NUM_ENVS, 25, generator=gen) * 2 - 1,
    }


@pytest.mark.parametrize("noise_method", ["flow_sde", "flow_noise"])
def test_rollout_extras_reach_the_learner_and_reproduce_the_logprobs(noise_method: str) -> None:
    config = load_config(
        None, ["policy.kind=vla", f"policy.noise_method={noise_method}", f"policy.action_chunk={CHUNK}"]
    )
    torch.manual_seed(0)
    policy = build_policy("vla", SPEC, ACTION_DIM, CHUNK, **config.policy.kwargs())
    host = PolicyHost(policy)
    batcher = InferenceBatcher(host, max_batch_size=16, max_wait_s=0.001).start()
    assembler = SegmentAssembler("env-0", NUM_ENVS, segment_length=STEPS)
    gen = torch.Generator().manual_seed(1)
    segments = []
    try:
        for step in range(STEPS + 1):
            observations = _observations(gen)
            outcome = StepOutcome(observations=observations, instructions=[INSTRUCTION] * NUM_ENVS, result=None)  # type: ignore[arg-type]
            if step:
                outcome.rewards = torch.rand(NUM_ENVS, generator=gen)
                outcome.terminated = torch.zeros(NUM_ENVS, dtype=torch.bool)
                outcome.truncated = torch.zeros(NUM_ENVS, dtype=torch.bool)
            outcome.result = batcher.submit(InferenceRequest(observations, [INSTRUCTION] * NUM_ENVS, from_stream=True))
            segments += assembler.record(outcome)
    finally:
        batcher.stop()
    assert len(segments) == NUM_ENVS
    wire = [segment_from_proto(segment_to_proto(s)) for s in segments]
    for original, decoded in zip(segments, wire, strict=True):
        assert set(decoded.extras) == set(original.extras) and decoded.extras, "the chain must travel with the data"
        for key, value in original.extras.items():
            assert decoded.extras[key].shape[0] == STEPS
            torch.testing.assert_close(decoded.extras[key], value)

    batch = build_rollout_batch(wire, AlgoConfig())
    logprobs, _entropy, _values = policy.evaluate_actions(
        batch.observations, batch.action_chunks, instructions=batch.instructions, extras=batch.extras
    )
    torch.testing.assert_close(logprobs, batch.old_logprobs, atol=1e-4, rtol=1e-4)

    core = PPOLearnerCore(
        policy,
        TorchEngine(policy.parameters(), lr=1e-4, max_grad_norm=1.0),
        AlgoConfig(update_epochs=1, num_minibatches=2, clip_ratio=0.2),
    )
    metrics = core.update(wire)
    # First minibatch of the first epoch runs on the rollout's weights: the KL estimate starts at ~0.
    assert abs(metrics["actor/approx_kl"]) < 0.05
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())

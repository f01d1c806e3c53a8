"""VLAPolicy / VLAModel on the tiny preset: shapes, KV cache, rollout-vs-training log-probs, gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsrl.policy import Policy, build_policy
from gsrl.policy.vla import flow
from gsrl.policy.vla.config import vla_config
from gsrl.policy.vla.model import VLAModel
from gsrl.policy.vla.policy import EXTRA_CHAIN, EXTRA_STOCHASTIC, VLAPolicy

CAMERA, QPOS = "rgb/3rd_view_camera", "agent/qpos"
SPEC = {CAMERA: ((24, 40, 3), "uint8"), QPOS: ((9,), "float32"), "extra/flag": ((2,), "int32")}
ACTION_DIM, CHUNK, BATCH, STEPS = 4, 3, 3, 4
INSTRUCTIONS = ["put the cube on the plate", "put the cube on the plate", "pick up the cube"]


def _policy(seed: int = 0, **kwargs: object) -> VLAPolicy:
    torch.manual_seed(seed)
    kwargs.setdefault("num_denoise_steps", STEPS)
    policy = build_policy("vla", SPEC, action_dim=ACTION_DIM, action_chunk=CHUNK, preset="tiny", **kwargs)
    assert isinstance(policy, VLAPolicy) and isinstance(policy, Policy)
    # A fresh adaRMS Dense is zero (openpi), which gates every expert block shut; perturb it so the
    # tests exercise a trained-looking expert whose attention and MLP weights are on the gradient path.
    with torch.no_grad():
        for name, param in policy.model.action_expert.named_parameters():
            if ".dense." in name:
                param.normal_(0.0, 0.05)
    return policy


def _obs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        CAMERA: torch.randint(0, 256, (BATCH, 24, 40, 3), dtype=torch.uint8, generator=gen),
        QPOS: torch.rand(BATCH, 9, generator=gen) * 2 - 1,
        "extra/flag": torch.zeros(BATCH, 2, dtype=torch.int32),
    }


def test_tiny_builds_with_a_few_million_parameters_and_pi05_has_the_published_count() -> None:
    policy = _policy()
    assert policy.image_keys == [CAMERA] and policy.state_keys == [QPOS]
    count = sum(p.numel() for p in policy.parameters())
    assert 1_000_000 < count < 5_000_000
    with torch.device("meta"):
        pi05 = VLAModel(vla_config("pi05").resolve(7, 5))
    heads = sum(p.numel() for p in pi05.value_head.parameters())
    # LeRobot pi05_base minus the unused expert lm_head (fact sheet 1.2), plus our value head.
    assert sum(p.numel() for p in pi05.parameters()) - heads == 3_353_433_872


def test_act_returns_bounded_chunks_with_finite_logprobs_and_values() -> None:
    for method in flow.NOISE_METHODS:
        policy = _policy(noise_method=method)
        out = policy.act(_obs(), INSTRUCTIONS)
        assert out.action_chunk.shape == (BATCH, CHUNK, ACTION_DIM)
        assert float(out.action_chunk.abs().max()) <= 1.0
        assert out.logprobs.shape == out.values.shape == (BATCH,)
        assert bool(torch.isfinite(out.logprobs).all()) and bool(torch.isfinite(out.values).all())
        chain, stochastic = out.extras[EXTRA_CHAIN], out.extras[EXTRA_STOCHASTIC]
        assert chain.shape == (BATCH, STEPS + 1, CHUNK, ACTION_DIM) and chain.dtype == torch.float32
        assert stochastic.shape == (BATCH, STEPS) and stochastic.dtype == torch.bool
        assert torch.equal(out.action_chunk, chain[:, -1].clamp(-1, 1))
        assert policy.value(_obs(), INSTRUCTIONS).shape == (BATCH,)


def test_kv_cached_sampling_equals_uncached_sampling() -> None:
    policy = _policy(noise_method="flow_noise")
    model = policy.model
    images, tokens, mask = policy.model_inputs(_obs(), INSTRUCTIONS)
    assert not bool(mask.all())  # padding present: the cache must respect the pad mask
    with torch.no_grad():
        cache = model.encode_prefix(images, tokens, mask)

        def cached(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v, out = model.predict_velocity(cache, x, t)
            return v, policy._noise_std(out)

        def uncached(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v, out, _ = model.forward_joint(images, tokens, mask, x, t)
            return v, policy._noise_std(out)

        x1 = torch.randn(BATCH, CHUNK, ACTION_DIM)
        joint = torch.ones(BATCH, STEPS, dtype=torch.bool)
        a = flow.sample_chain(cached, x1, STEPS, joint, "flow_noise", generator=torch.Generator().manual_seed(3))
        b = flow.sample_chain(uncached, x1, STEPS, joint, "flow_noise", generator=torch.Generator().manual_seed(3))
        assert torch.allclose(a.chain, b.chain, atol=1e-5)
        assert torch.allclose(a.stds, b.stds, atol=1e-6)
        assert torch.allclose(model.value(cache), model.forward_joint(images, tokens, mask, x1, torch.ones(BATCH))[2])
        # The velocity really depends on the prompt, the time and x_t (a cache bug could hide behind constants).
        v = model.predict_velocity(cache, x1, torch.full((BATCH,), 0.5))[0]
        assert not torch.allclose(v[0], v[2], atol=1e-4)
        assert not torch.allclose(v, model.predict_velocity(cache, x1, torch.full((BATCH,), 0.9))[0], atol=1e-4)


@pytest.mark.parametrize(
    ("method", "joint", "reduction"),
    [("flow_sde", False, "sum"), ("flow_sde", True, "sum"), ("flow_noise", True, "sum"), ("flow_noise", True, "mean")],
)
def test_evaluate_actions_reproduces_rollout_logprobs(method: str, joint: bool, reduction: str) -> None:
    policy = _policy(noise_method=method, joint_logprob=joint, chain_reduction=reduction)
    out = policy.act(_obs(), INSTRUCTIONS)
    assert bool((out.extras[EXTRA_STOCHASTIC].sum(1) == (STEPS if joint else 1)).all())
    logprobs, entropy, values = policy.evaluate_actions(_obs(), out.action_chunk, INSTRUCTIONS, extras=out.extras)
    ratio = torch.exp(logprobs - out.logprobs)
    assert torch.allclose(ratio, torch.ones(BATCH), atol=1e-5)
    assert torch.allclose(values, out.values, atol=1e-6)
    assert entropy.shape == (BATCH,) and bool(torch.isfinite(entropy).all())
    # A shuffled minibatch (the learner's case) pairs rows with their own extras.
    perm = torch.tensor([2, 0, 1])
    obs = {k: v[perm] for k, v in _obs().items()}
    extras = {k: v[perm] for k, v in out.extras.items()}
    shuffled, _, _ = policy.evaluate_actions(obs, out.action_chunk[perm], [INSTRUCTIONS[i] for i in perm], extras)
    assert torch.allclose(shuffled, out.logprobs[perm], atol=1e-4)
    # ... and new weights move the ratio away from 1.
    with torch.no_grad():
        policy.model.action_out_proj.weight.mul_(1.05)
    changed, _, _ = policy.evaluate_actions(_obs(), out.action_chunk, INSTRUCTIONS, extras=out.extras)
    assert not torch.allclose(changed, out.logprobs, atol=1e-3)


def test_evaluate_actions_needs_the_chain() -> None:
    policy = _policy()
    out = policy.act(_obs(), INSTRUCTIONS)
    with pytest.raises(ValueError, match="extras"):
        policy.evaluate_actions(_obs(), out.action_chunk, INSTRUCTIONS)


def test_gradients_reach_expert_value_head_and_noise_head() -> None:
    policy = _policy(noise_method="flow_noise")
    out = policy.act(_obs(), INSTRUCTIONS)
    logprobs, entropy, values = policy.evaluate_actions(_obs(), out.action_chunk, INSTRUCTIONS, out.extras)
    (logprobs.sum() + entropy.sum() + values.sum()).backward()

    def has_grad(prefix: str) -> bool:
        params = [p for n, p in policy.named_parameters() if n.startswith(prefix)]
        assert params, prefix
        return all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)

    for prefix in (
        "model.action_expert.layers.0.self_attn.",
        "model.action_expert.layers.2.mlp.",
        "model.action_expert.layers.1.input_layernorm.dense.",
        "model.time_mlp_in.",
        "model.action_in_proj.",
        "model.action_out_proj.",
        "model.value_head.",
        "model.noise_head.",
        "model.language_model.layers.1.self_attn.k_proj.",  # via the cached keys
        "model.vision_tower.encoder.layers.0.",
    ):
        assert has_grad(prefix), prefix


def test_train_expert_only_freezes_the_vlm_but_trains_the_value_head() -> None:
    policy = _policy(train_expert_only=True)
    out = policy.act(_obs(), INSTRUCTIONS)
    logprobs, _, values = policy.evaluate_actions(_obs(), out.action_chunk, INSTRUCTIONS, out.extras)
    (logprobs.sum() + values.sum()).backward()
    vlm = [p for n, p in policy.named_parameters() if n.startswith(("model.language_model.", "model.vision_tower."))]
    assert all(not p.requires_grad and p.grad is None for p in vlm)
    assert policy.model.value_head.mlp[0].weight.grad is not None
    assert policy.model.action_expert.layers[0].self_attn.q_proj.weight.grad is not None


def test_deterministic_act_is_reproducible_pure_ode() -> None:
    policy = _policy()
    a = policy.act(_obs(), INSTRUCTIONS, deterministic=True)
    torch.manual_seed(123)  # global RNG state must not matter
    b = policy.act(_obs(), INSTRUCTIONS, deterministic=True)
    assert torch.equal(a.action_chunk, b.action_chunk)
    assert not bool(a.extras[EXTRA_STOCHASTIC].any())
    assert bool((a.logprobs == 0).all())
    stochastic = policy.act(_obs(), INSTRUCTIONS)
    assert not torch.equal(stochastic.action_chunk, a.action_chunk)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    policy = _policy(state_low=[-2.0] * 9, state_high=[2.0] * 9)
    policy.save_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(7)
    loaded = build_policy(
        "vla",
        SPEC,
        action_dim=ACTION_DIM,
        action_chunk=CHUNK,
        num_denoise_steps=STEPS,
        checkpoint=str(tmp_path / "ckpt"),
    )
    for (name, a), (_, b) in zip(policy.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    expected = policy.act(_obs(), INSTRUCTIONS, deterministic=True).action_chunk
    assert torch.equal(loaded.act(_obs(), INSTRUCTIONS, deterministic=True).action_chunk, expected)


def test_flow_matching_loss_trains() -> None:
    policy = _policy()
    actions = torch.rand(BATCH, CHUNK, ACTION_DIM) * 2 - 1
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(12):
        loss = policy.flow_matching_loss(_obs(), actions, INSTRUCTIONS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])

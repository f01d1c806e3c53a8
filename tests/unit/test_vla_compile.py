"""``VLAPolicy(compile_mode=...)`` on the tiny preset on the CPU: mode checking, batch buckets and padding, the
CUDA-graph step marks, and a compiled ``act`` against the eager one (inductor's C++ backend; one compile)."""

from __future__ import annotations

import shutil

import pytest
import torch

from gsrl.policy import build_policy
from gsrl.policy.vla import compile as vla_compile
from gsrl.policy.vla.compile import COMPILE_MODES, batch_bucket, pad_rows
from gsrl.policy.vla.policy import EXTRA_CHAIN, EXTRA_STOCHASTIC, VLAPolicy

CAMERA, QPOS = "rgb/3rd_view_camera", "agent/qpos"
SPEC = {CAMERA: ((24, 40, 3), "uint8"), QPOS: ((9,), "float32")}
ACTION_DIM, CHUNK, STEPS = 4, 3, 4


def _policy(**kwargs: object) -> VLAPolicy:
    torch.manual_seed(0)
    policy = build_policy(
        "vla", SPEC, action_dim=ACTION_DIM, action_chunk=CHUNK, preset="tiny", num_denoise_steps=STEPS, **kwargs
    )
    assert isinstance(policy, VLAPolicy)
    with torch.no_grad():  # open the zero-initialised adaRMS gates (as tests/unit/test_vla_model.py does)
        for name, param in policy.model.action_expert.named_parameters():
            if ".dense." in name:
                param.normal_(0.0, 0.05)
    return policy.eval()


def _obs(batch: int, seed: int = 1) -> tuple[dict[str, torch.Tensor], list[str]]:
    gen = torch.Generator().manual_seed(seed)
    obs = {
        CAMERA: torch.randint(0, 256, (batch, 24, 40, 3), dtype=torch.uint8, generator=gen),
        QPOS: torch.rand(batch, 9, generator=gen) * 2 - 1,
    }
    instructions = ["put the cube on the plate", "pick up the cube", "open the drawer"] * batch
    return obs, instructions[:batch]


def _assert_outputs_close(a, b, atol: float = 1e-5) -> None:
    for name in ("action_chunk", "logprobs", "values"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=1e-5, msg=name)
    torch.testing.assert_close(a.extras[EXTRA_CHAIN], b.extras[EXTRA_CHAIN], atol=atol, rtol=1e-5)
    assert torch.equal(a.extras[EXTRA_STOCHASTIC], b.extras[EXTRA_STOCHASTIC])


def test_unknown_compile_mode_raises_naming_the_modes() -> None:
    with pytest.raises(ValueError, match="compile_mode='fast'") as info:
        _policy(compile_mode="fast")
    assert all(mode in str(info.value) for mode in COMPILE_MODES)
    with pytest.raises(ValueError, match="compile_max_batch"):
        _policy(compile_mode="default", compile_max_batch=0)
    assert _policy()._compiled is None and not _policy().pad_batches  # eager by default


def test_batch_buckets_are_powers_of_two_up_to_the_cap_then_its_multiples() -> None:
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 16, 17, 33, 63, 64)] == [1, 2, 4, 4, 8, 16, 32, 64, 64, 64]
    assert [batch_bucket(b) for b in (65, 128, 129)] == [128, 128, 192]
    assert [batch_bucket(b, max_batch=48) for b in (20, 33, 48, 49)] == [32, 48, 48, 96]
    assert len({batch_bucket(b) for b in range(1, 65)}) == 7  # a policy server compiles at most 7 graphs
    with pytest.raises(ValueError):
        batch_bucket(0)


def test_pad_rows_repeats_the_last_row() -> None:
    x = torch.arange(6.0).view(3, 2)
    padded = pad_rows(x, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3:], x[2:].expand(2, 2))
    assert pad_rows(x, 3) is x
    t = torch.tensor(0.75).expand(3)  # a flow time as sample_chain passes it (stride 0)
    assert torch.equal(pad_rows(t, 4), torch.full((4,), 0.75))
    # The same layout padded or not: compiled graphs guard on strides too.
    assert pad_rows(t, 3).stride() == (1,) and pad_rows(x.t(), 2).is_contiguous()
    with pytest.raises(ValueError):
        pad_rows(x, 2)


@pytest.mark.parametrize("noise_method", ["flow_sde", "flow_noise"])
def test_padded_act_and_value_give_the_unpadded_rows(noise_method: str) -> None:
    policy = _policy(noise_method=noise_method)
    obs, instructions = _obs(3)
    seen: list[int] = []
    policy.model.vision_tower.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )

    def run() -> tuple:
        det = policy.act(obs, instructions, deterministic=True)
        torch.manual_seed(7)  # the random draws (x_1, stochastic steps, noise) are made on the real 3 rows
        sto = policy.act(obs, instructions)
        return det, sto, policy.value(obs, instructions)

    plain = run()
    policy.pad_batches = True  # what compile_mode switches on, here without compiling
    padded = run()
    assert seen == [3, 3, 3, 4, 4, 4]  # the model saw bucket 4; the outputs are sliced back to 3 rows
    for a, b in zip(plain[:2], padded[:2], strict=True):
        assert a.action_chunk.shape == (3, CHUNK, ACTION_DIM)
        _assert_outputs_close(a, b)
    torch.testing.assert_close(plain[2], padded[2], atol=1e-5, rtol=1e-5)


def test_reduce_overhead_marks_one_cuda_graph_step_per_policy_call(monkeypatch) -> None:
    """One generation per call: the prefix cache that every denoising step reads is never overwritten mid-call."""
    policy = _policy(compile_mode="reduce-overhead")
    assert policy._compiled is not None and policy._compiled.cudagraphs and policy.pad_batches
    log: list[str] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: log.append("step"))
    for name, tag in (("encode_prefix", "prefix"), ("predict_velocity", "velocity"), ("forward_joint", "joint")):
        eager = getattr(policy.model, name)  # stand-ins for the compiled passes: no compile in this test

        def logged(*args, _eager=eager, _tag=tag, **kwargs):
            log.append(_tag)
            return _eager(*args, **kwargs)

        monkeypatch.setattr(policy._compiled, name, logged)
    obs, instructions = _obs(3)
    out = policy.act(obs, instructions)
    assert log == ["step", "prefix"] + ["velocity"] * STEPS
    log.clear()
    policy.value(obs, instructions)
    assert log == ["step", "prefix"]
    log.clear()
    policy.evaluate_actions(obs, out.action_chunk, instructions, extras=out.extras)
    assert log == ["step", "prefix", "velocity"]
    log.clear()
    policy.flow_matching_loss(obs, torch.zeros(3, policy.config.action_horizon, ACTION_DIM), instructions)
    assert log == ["step", "joint"]
    assert not _policy(compile_mode="default")._compiled.cudagraphs


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_act_matches_eager_and_reuses_its_bucket() -> None:
    from torch._dynamo.utils import counters

    shallow = {"config_overrides": {key: {"depth": 1} for key in ("vision", "language", "expert")}}  # faster compile
    eager, compiled = _policy(**shallow), _policy(compile_mode="default", **shallow)
    compiled.load_state_dict(eager.state_dict())
    assert isinstance(compiled._compiled, vla_compile.CompiledVLA)
    obs, instructions = _obs(3)
    _assert_outputs_close(
        eager.act(obs, instructions, deterministic=True), compiled.act(obs, instructions, deterministic=True)
    )
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the prefix and velocity passes went through dynamo
    outs = []
    for policy in (eager, compiled):
        torch.manual_seed(3)
        outs.append(policy.act(obs, instructions))
    _assert_outputs_close(*outs)
    assert bool((outs[0].logprobs != 0).all())
    torch.testing.assert_close(eager.value(obs, instructions), compiled.value(obs, instructions), atol=1e-5, rtol=0)
    obs4, instructions4 = _obs(4, seed=2)  # same bucket as 3 rows: no new graph
    _assert_outputs_close(
        eager.act(obs4, instructions4, deterministic=True), compiled.act(obs4, instructions4, deterministic=True)
    )
    assert counters["stats"]["unique_graphs"] == graphs


def test_run_config_passes_compile_mode_and_checks_it() -> None:
    """policy.compile_mode reaches the policy's kwargs; the config's list of modes is the compile module's."""
    from gsrl.config import VLA_COMPILE_MODES, ConfigError, from_dict
    from gsrl.policy.vla.compile import COMPILE_MODES

    assert ("", *COMPILE_MODES) == VLA_COMPILE_MODES
    kwargs = from_dict({"policy": {"kind": "vla", "compile_mode": "default", "bf16_autocast": False}}).policy.kwargs()
    assert kwargs["compile_mode"] == "default" and kwargs["bf16_autocast"] is False
    assert "compile_mode" not in from_dict({"policy": {"kind": "vla"}}).policy.kwargs()
    with pytest.raises(ConfigError, match="compile_mode"):
        from_dict({"policy": {"kind": "vla", "compile_mode": "fast"}})

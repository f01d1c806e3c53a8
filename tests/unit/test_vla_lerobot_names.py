"""LeRobot pi0.5 names <-> VLAModel names: inverse mapping, loading with shape checks, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gsrl.policy import build_policy
from gsrl.policy.vla import lerobot_names as names
from gsrl.policy.vla.config import vla_config
from gsrl.policy.vla.model import VLAModel

PG = "model.paligemma_with_expert.paligemma.model."
EX = "model.paligemma_with_expert.gemma_expert.model."


def _model(seed: int) -> VLAModel:
    torch.manual_seed(seed)
    return VLAModel(vla_config("tiny", noise_head=True).resolve(4, 3))


def _lerobot_state(model: VLAModel) -> dict[str, torch.Tensor]:
    """The model's weights under LeRobot names, plus the keys a real checkpoint carries that we drop."""
    state = {names.native_to_lerobot(k): v.clone() for k, v in model.state_dict().items()}
    embed = state[PG + "language_model.embed_tokens.weight"]
    state["model.paligemma_with_expert.paligemma.lm_head.weight"] = embed.clone()  # tied
    width = model.config.expert.width
    state["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(7, width)
    state[EX + "layers.0.input_layernorm.weight"] = torch.zeros(width)  # plain norm replaced by adaRMS
    return state


def test_known_names_map_both_ways() -> None:
    cases = {
        PG
        + "vision_tower.vision_model.embeddings.patch_embedding.bias": "vision_tower.embeddings.patch_embedding.bias",
        PG + "vision_tower.vision_model.encoder.layers.26.mlp.fc1.bias": "vision_tower.encoder.layers.26.mlp.fc1.bias",
        PG + "multi_modal_projector.linear.weight": "multi_modal_projector.weight",
        PG + "language_model.layers.17.self_attn.k_proj.weight": "language_model.layers.17.self_attn.k_proj.weight",
        PG + "language_model.norm.weight": "language_model.norm.weight",
        EX
        + "layers.3.post_attention_layernorm.dense.bias": "action_expert.layers.3.post_attention_layernorm.dense.bias",
        EX + "norm.dense.weight": "action_expert.norm.dense.weight",
        "model.time_mlp_out.bias": "time_mlp_out.bias",
        "model.value_head.mlp.6.weight": "value_head.mlp.6.weight",
        "model.noise_head.mlp_logvar.moduleList.2.linear_1.weight": "noise_head.mlp_logvar.4.weight",
    }
    for external, native in cases.items():
        assert names.lerobot_to_native(external) == native
        assert names.native_to_lerobot(native) == external
    # openpi / RLinf (no "model." prefix), transformers-5 SigLIP and pre-4.52 PaliGemma layouts.
    assert names.lerobot_to_native("action_in_proj.weight") == "action_in_proj.weight"
    assert (
        names.lerobot_to_native(PG + "vision_tower.embeddings.position_embedding.weight")
        == "vision_tower.embeddings.position_embedding.weight"
    )
    assert (
        names.lerobot_to_native("paligemma_with_expert.paligemma.language_model.model.layers.0.mlp.up_proj.weight")
        == "language_model.layers.0.mlp.up_proj.weight"
    )
    assert names.lerobot_to_native("model.action_time_mlp_in.weight") == "time_mlp_in.weight"
    for dropped in (
        "model.paligemma_with_expert.gemma_expert.lm_head.weight",
        EX + "layers.5.input_layernorm.weight",
        "model.state_proj.weight",
        "noise_head.logvar_min",
    ):
        assert names.lerobot_to_native(dropped) is None


def test_pi05_names_and_shapes_match_the_published_layout() -> None:
    with torch.device("meta"):
        model = VLAModel(vla_config("pi05").resolve(7, 5))
    shapes = {names.native_to_lerobot(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(names.lerobot_to_native(k) is not None for k in shapes)
    assert shapes[PG + "vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes[PG + "vision_tower.vision_model.embeddings.position_embedding.weight"] == (256, 1152)
    assert shapes[PG + "multi_modal_projector.linear.weight"] == (2048, 1152)
    assert shapes[PG + "language_model.embed_tokens.weight"] == (257152, 2048)
    assert shapes[PG + "language_model.layers.17.self_attn.k_proj.weight"] == (256, 2048)
    assert shapes[PG + "language_model.layers.0.mlp.gate_proj.weight"] == (16384, 2048)
    assert shapes[EX + "layers.0.self_attn.q_proj.weight"] == (2048, 1024)
    assert shapes[EX + "layers.0.self_attn.o_proj.weight"] == (1024, 2048)
    assert shapes[EX + "layers.17.input_layernorm.dense.weight"] == (3072, 1024)
    assert shapes[EX + "norm.dense.bias"] == (3072,)
    assert shapes["model.action_in_proj.weight"] == (1024, 32)
    assert shapes["model.action_out_proj.weight"] == (32, 1024)
    assert shapes["model.time_mlp_in.weight"] == (1024, 1024)
    assert not any("lm_head" in k for k in shapes)


def test_lerobot_state_dict_loads_back_exactly() -> None:
    source, target = _model(0), _model(1)
    state = _lerobot_state(source)
    report = names.load_lerobot_state_dict(target, state)
    assert len(report.dropped) == 3 and not report.missing_allowed
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_tied_lm_head_fills_a_missing_embedding_and_heads_may_be_absent() -> None:
    source, target = _model(0), _model(1)
    state = _lerobot_state(source)
    del state[PG + "language_model.embed_tokens.weight"]
    state = {k: v for k, v in state.items() if "value_head" not in k and "noise_head" not in k}
    report = names.load_lerobot_state_dict(target, state)
    assert torch.equal(target.language_model.embed_tokens.weight, source.language_model.embed_tokens.weight)
    assert any(k.startswith("value_head.") for k in report.missing_allowed)


def test_mismatches_are_reported_by_name() -> None:
    target = _model(1)
    state = _lerobot_state(_model(0))
    bad = EX + "layers.1.self_attn.q_proj.weight"
    state[bad] = torch.zeros(3, 3)
    del state[PG + "language_model.layers.0.mlp.down_proj.weight"]
    state["model.paligemma_with_expert.something_new.weight"] = torch.zeros(1)
    with pytest.raises(names.CheckpointMismatchError) as err:
        names.load_lerobot_state_dict(target, state)
    message = str(err.value)
    assert "action_expert.layers.1.self_attn.q_proj.weight: [3, 3] vs [192, 96]" in message
    assert "language_model.layers.0.mlp.down_proj.weight" in err.value.missing
    assert "paligemma_with_expert.something_new.weight" in err.value.unexpected


def test_policy_loads_a_lerobot_safetensors_file(tmp_path: Path) -> None:
    spec = {"rgb/base": ((32, 32, 3), "uint8"), "agent/qpos": ((9,), "float32")}
    torch.manual_seed(0)
    source = build_policy("vla", spec, action_dim=4, action_chunk=3, noise_method="flow_noise")
    path = tmp_path / "model.safetensors"
    save_file(_lerobot_state(source.model), str(path))
    torch.manual_seed(5)
    loaded = build_policy("vla", spec, action_dim=4, action_chunk=3, noise_method="flow_noise", checkpoint=str(path))
    assert torch.equal(loaded.model.action_out_proj.weight, source.model.action_out_proj.weight)
    assert torch.equal(
        loaded.model.vision_tower.encoder.layers[0].mlp.fc1.weight,
        source.model.vision_tower.encoder.layers[0].mlp.fc1.weight,
    )

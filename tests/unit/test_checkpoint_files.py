"""Checkpoint weight files: one model.safetensors or size-limited shards with an index, and `gsrl export`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gsrl.checkpoint_files import SHARD_INDEX, WEIGHTS_FILE, load_weights, resolve_weights, save_sharded
from gsrl.export import export_checkpoint
from gsrl.export import main as export_main
from gsrl.policy import build_policy, load_model_weights


def _state() -> dict[str, torch.Tensor]:
    """Five float32 tensors of 4 KiB and one int64 step counter (8 bytes), in insertion order."""
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(32, 32, generator=gen) for i in range(5)}
    state["step"] = torch.tensor([7], dtype=torch.int64)
    return state


def test_shards_hold_at_most_the_limit_and_load_back_exactly(tmp_path: Path) -> None:
    state = _state()
    written = save_sharded(state, tmp_path / "ckpt", max_shard_bytes=9 * 1024)  # two 4 KiB tensors per shard
    names = [p.name for p in written]
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [SHARD_INDEX]
    index = json.loads((tmp_path / "ckpt" / SHARD_INDEX).read_text())
    assert index["metadata"]["total_size"] == 5 * 4096 + 8
    assert index["weight_map"]["layer0.weight"] == index["weight_map"]["layer1.weight"] == names[0]
    assert index["weight_map"]["layer4.weight"] == index["weight_map"]["step"] == names[2]
    assert resolve_weights(tmp_path / "ckpt") == tmp_path / "ckpt" / SHARD_INDEX
    loaded = load_weights(tmp_path / "ckpt")
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor) and loaded[key].dtype == tensor.dtype, key


def test_one_shard_is_a_plain_model_safetensors_and_a_big_tensor_gets_its_own(tmp_path: Path) -> None:
    assert [p.name for p in save_sharded(_state(), tmp_path / "one", max_shard_bytes=1 << 20)] == [WEIGHTS_FILE]
    assert resolve_weights(tmp_path / "one") == tmp_path / "one" / WEIGHTS_FILE
    written = save_sharded(_state(), tmp_path / "small", max_shard_bytes=100)  # every tensor is over the limit
    assert len(written) == 6 + 1 and set(load_weights(tmp_path / "small")) == set(_state())


def test_an_export_never_lands_on_existing_weights(tmp_path: Path) -> None:
    save_sharded(_state(), tmp_path / "ckpt", max_shard_bytes=9 * 1024)
    with pytest.raises(FileExistsError, match="already holds weights"):
        save_sharded(_state(), tmp_path / "ckpt", max_shard_bytes=1 << 20)


def test_a_missing_or_mismatched_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    written = save_sharded(_state(), tmp_path / "ckpt", max_shard_bytes=9 * 1024)
    written[1].unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_weights(tmp_path / "ckpt")
    save_file({"layer2.weight": torch.zeros(2), "stray": torch.zeros(1)}, str(written[1]))  # layer3 absent
    with pytest.raises(ValueError, match=r"unlisted \['stray'\], absent \['layer3.weight'\]"):
        load_weights(tmp_path / "ckpt")
    (tmp_path / "ckpt" / SHARD_INDEX).write_text("{}")
    with pytest.raises(ValueError, match="not a safetensors shard index"):
        load_weights(tmp_path / "ckpt")


def test_a_path_without_weights_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} has no model.safetensors"):
        load_model_weights(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors does not exist"):
        load_model_weights(tmp_path / "nowhere.safetensors")


def test_export_casts_floats_only_and_copies_the_checkpoint_files(tmp_path: Path) -> None:
    source = tmp_path / "ckpt"
    save_sharded(_state(), source, max_shard_bytes=1 << 20)
    (source / "vla_config.json").write_text('{"preset": "tiny"}\n')
    (source / "tensorboard").mkdir()
    export_checkpoint(source, tmp_path / "bf16", dtype="bfloat16", max_shard_mib=4 / 1024)  # 4 KiB shards
    loaded = load_weights(tmp_path / "bf16")
    assert loaded["layer3.weight"].dtype == torch.bfloat16 and loaded["step"].dtype == torch.int64
    assert torch.equal(loaded["layer3.weight"], _state()["layer3.weight"].to(torch.bfloat16))
    assert (tmp_path / "bf16" / "vla_config.json").read_text() == '{"preset": "tiny"}\n'
    assert not (tmp_path / "bf16" / "tensorboard").exists()
    # shards are sized after the cast: two 2 KiB bfloat16 tensors fill a 4 KiB shard (float32 ones would take six)
    assert len(list((tmp_path / "bf16").glob("model-*-of-*.safetensors"))) == 3


def test_export_command_refuses_bad_input_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        export_main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "missing does not exist" in capsys.readouterr().err
    save_sharded(_state(), tmp_path / "ckpt", max_shard_bytes=1 << 20)
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--max-shard-mib", "-1"])
    assert "max_shard_mib must be >= 0" in capsys.readouterr().err


def test_a_vla_exported_to_bfloat16_shards_loads_and_acts_like_the_original(tmp_path: Path) -> None:
    spec = {"rgb/cam": ((16, 16, 3), "uint8"), "agent/qpos": ((9,), "float32")}
    torch.manual_seed(0)
    policy = build_policy("vla", spec, action_dim=4, action_chunk=3, preset="tiny")
    policy.save_checkpoint(tmp_path / "sft")
    assert (
        export_main(
            [str(tmp_path / "sft"), "--out", str(tmp_path / "relay"), "--dtype", "bfloat16", "--max-shard-mib", "1"]
        )
        == 0
    )
    shards = sorted((tmp_path / "relay").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size < 1.1 * 2**20 for p in shards)
    assert (tmp_path / "relay" / "vla_config.json").is_file() and (tmp_path / "relay" / "tokenizer.json").is_file()
    loaded = build_policy("vla", spec, action_dim=4, action_chunk=3, checkpoint=str(tmp_path / "relay"))
    for (name, a), (_, b) in zip(policy.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert b.dtype == a.dtype, name  # the model keeps its own dtype; the values are bfloat16-rounded
        assert torch.equal(b, a.to(torch.bfloat16).to(a.dtype)) if a.is_floating_point() else torch.equal(a, b), name
    gen = torch.Generator().manual_seed(1)
    obs = {
        "rgb/cam": torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=gen),
        "agent/qpos": torch.rand(2, 9, generator=gen),
    }
    instructions = ["put the cube on the plate"] * 2
    expected = policy.act(obs, instructions, deterministic=True).action_chunk
    actual = loaded.act(obs, instructions, deterministic=True).action_chunk
    assert actual.shape == expected.shape and torch.allclose(actual, expected, atol=0.05)

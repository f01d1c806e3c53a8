"""Byte tokenizer: round trip, pi0.5 prompt layout, 256-bin state discretization, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gsrl.policy.vla.tokenizer import ByteTokenizer, clean_instruction, discretize_state


def test_round_trip_text() -> None:
    tok = ByteTokenizer()
    for text in ["put the cube on the plate", "", "Würfel → Teller ✓"]:
        ids = tok.encode(text)
        assert all(tok.byte_offset <= i < tok.state_offset for i in ids)
        assert tok.decode(ids) == text
    assert tok.vocab_size == 3 + 256 + 256


def test_state_discretization_matches_openpi_bins() -> None:
    edges = torch.tensor([-1.0, -1.0 + 2 / 256, 0.0, 1.0 - 2 / 256 - 1e-4, 1.0 - 2 / 256, 1.0])
    assert discretize_state(edges).tolist() == [0, 1, 128, 254, 255, 255]
    assert discretize_state(torch.tensor([-3.0, 7.0])).tolist() == [0, 255]  # clamped, not -1
    values = torch.rand(1000, dtype=torch.float64) * 2 - 1
    openpi = np.digitize(values.numpy(), bins=np.linspace(-1, 1, 257)[:-1]) - 1
    assert discretize_state(values).tolist() == openpi.tolist()


def test_prompt_layout_with_and_without_state() -> None:
    tok = ByteTokenizer()
    ids = tok.prompt_ids("put_the cube\n", [0, 128, 255], max_len=64)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == "Task: put the cube, State: <s:0><s:128><s:255>;\nAction: "
    plain = tok.prompt_ids("pick", None, max_len=16)
    assert plain[0] == tok.bos_id and tok.decode(plain) == "pick\n"


def test_batch_padding_and_truncation_keep_the_state() -> None:
    tok = ByteTokenizer()
    bins = torch.tensor([[1, 2], [3, 4]])
    ids, mask = tok.encode_batch(["short", "a much longer instruction " * 5], bins, max_len=40)
    assert ids.shape == mask.shape == (2, 40)
    assert bool(mask[1].all()) and not bool(mask[0].all())
    assert bool((ids[0][~mask[0]] == tok.pad_id).all())
    assert tok.decode(ids[1].tolist()).endswith(", State: <s:3><s:4>;\nAction: ")
    with pytest.raises(ValueError, match="max_token_len"):
        tok.prompt_ids("x", [1] * 30, max_len=20)


def test_clean_instruction() -> None:
    assert clean_instruction("  pick_up\nthe cube ") == "pick up the cube"


def test_save_and_load(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    tok.save(tmp_path / "tokenizer.json")
    loaded = ByteTokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.vocab_size == tok.vocab_size
    (tmp_path / "bad.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="kind"):
        ByteTokenizer.load(tmp_path / "bad.json")

"""An offline byte-level tokenizer for the VLA prompt, with 256 dedicated robot-state bin tokens.

pi0.5 writes the robot state into the prompt as text: ``"Task: {text}, State: {s_1 ... s_k};\\nAction: "``
where each s_i is the state (normalized to [-1, 1]) discretized into 256 bins [openpi tokenizer.py].
PaliGemma's SentencePiece model turns the integers into digit tokens; there is no hub here, so this
tokenizer needs no file at all: ids are

    0 PAD, 1 BOS, 2 EOS | 3 .. 258 the UTF-8 bytes 0..255 | 259 .. 514 state bins 0..255

and a bin is one token instead of up to four digit pieces (shorter prompts, same information). It is
saved as a small JSON beside the checkpoint so a later version can refuse a layout it does not know.
Note: pi05_base weights were trained with PaliGemma's SentencePiece ids; with this tokenizer their
language embeddings see different ids, so fine-tuning from them needs a swap to that tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

NUM_STATE_BINS = 256


def clean_instruction(text: str) -> str:
    """openpi's prompt cleaning: strip, and '_' / newlines become spaces."""
    return text.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: Tensor, num_bins: int = NUM_STATE_BINS) -> Tensor:
    """Normalized state [..., S] in [-1, 1] -> bin ids [..., S] long in 0..num_bins-1.

    openpi: ``digitize(state, linspace(-1, 1, 257)[:-1]) - 1``, i.e. bins of width 2/256 with bin 0 =
    [-1, -1 + 2/256). openpi lets values below -1 become -1; a token id must exist, so out-of-range
    values are clamped to the end bins here.
    """
    boundaries = torch.linspace(-1.0, 1.0, num_bins + 1, dtype=torch.float64, device=state.device)[:-1]
    # right=True matches numpy.digitize's default: index i with boundaries[i-1] <= x < boundaries[i].
    bins = torch.bucketize(state.to(torch.float64), boundaries, right=True) - 1
    return bins.clamp_(0, num_bins - 1)


class ByteTokenizer:
    """Bytes + state bins + 3 specials (see module docstring for the id layout)."""

    kind = "gsrl-byte-v1"
    pad_id, bos_id, eos_id = 0, 1, 2
    byte_offset = 3

    def __init__(self, num_state_bins: int = NUM_STATE_BINS) -> None:
        self.num_state_bins = num_state_bins
        self.state_offset = self.byte_offset + 256

    @property
    def vocab_size(self) -> int:
        return self.state_offset + self.num_state_bins

    def encode(self, text: str) -> list[int]:
        return [self.byte_offset + b for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; state bins render as ``<s:k>``; specials are dropped."""
        out: list[str] = []
        raw = bytearray()
        for i in ids:
            i = int(i)
            if self.byte_offset <= i < self.state_offset:
                raw.append(i - self.byte_offset)
                continue
            if raw:
                out.append(raw.decode("utf-8", errors="replace"))
                raw = bytearray()
            if self.state_offset <= i < self.vocab_size:
                out.append(f"<s:{i - self.state_offset}>")
        if raw:
            out.append(raw.decode("utf-8", errors="replace"))
        return "".join(out)

    def state_token_ids(self, bins: Tensor) -> Tensor:
        """Bin ids [..., S] (0..255) -> token ids [..., S]."""
        return bins.long() + self.state_offset

    def prompt_ids(self, instruction: str, state_bins: Sequence[int] | None, max_len: int) -> list[int]:
        """One prompt, at most ``max_len`` ids: pi0.5's format with state, pi0's (BOS text "\\n") without.

        A long instruction is cut (not the state or the "Action:" marker), so the model always sees
        where the answer starts.
        """
        text = clean_instruction(instruction)
        if state_bins is None:
            head, tail = [self.bos_id], self.encode("\n")
        else:
            head = [self.bos_id, *self.encode("Task: ")]
            tail = [*self.encode(", State: "), *(self.state_offset + int(b) for b in state_bins)]
            tail += self.encode(";\nAction: ")
        body = self.encode(text)
        room = max_len - len(head) - len(tail)
        if room < 0:
            raise ValueError(f"max_token_len={max_len} cannot hold the prompt frame ({len(head) + len(tail)} tokens)")
        return head + body[:room] + tail

    def encode_batch(
        self, instructions: Sequence[str], state_bins: Tensor | None, max_len: int
    ) -> tuple[Tensor, Tensor]:
        """Prompts for B rows -> (ids [B, max_len] long, mask [B, max_len] bool), right-padded with PAD.

        ``state_bins`` is [B, S] long (``discretize_state``) or None (no state in the prompt).
        """
        rows = len(instructions)
        ids = torch.full((rows, max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, max_len), dtype=torch.bool)
        bins = state_bins.cpu().tolist() if state_bins is not None else [None] * rows
        for row, (instruction, row_bins) in enumerate(zip(instructions, bins, strict=True)):
            prompt = self.prompt_ids(instruction, row_bins, max_len)
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            mask[row, : len(prompt)] = True
        return ids, mask

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "num_state_bins": self.num_state_bins, "vocab_size": self.vocab_size}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ByteTokenizer:
        data = json.loads(Path(path).read_text())
        if data.get("kind") != cls.kind:
            raise ValueError(f"{path}: tokenizer kind {data.get('kind')!r}, expected {cls.kind!r}")
        tok = cls(num_state_bins=int(data["num_state_bins"]))
        if tok.vocab_size != int(data["vocab_size"]):
            raise ValueError(f"{path}: vocab_size {data['vocab_size']} does not match the layout ({tok.vocab_size})")
        return tok

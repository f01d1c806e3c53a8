"""Gemma-style decoder layers whose two streams (LM prefix, action-expert suffix) share one attention.

pi0's "mixture of experts" [openpi gemma.py, pi0_pytorch.py]: every layer, the prefix tokens go through
the LM's norms / projections / MLP and the suffix tokens through the expert's, but the queries, keys and
values of both are concatenated along the sequence and attend in a single attention with a block mask.
The expert's norms are adaptive (pi0.5 adaRMS): a time-conditioned Dense gives (scale, shift, gate), and
the gate scales each residual branch. Parameter names follow LeRobot's ``paligemma_with_expert`` modules
(``layers.{i}.self_attn.q_proj``, ``input_layernorm.dense``, ``mlp.gate_proj``, ...).

Every parameter is read inside its own module's ``forward`` (Linear / norm calls), so ZeRO-3's per-module
gather hooks see all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm, apply_rotary_pos_emb, repeat_kv

from gsrl.policy.vla.config import StreamConfig

# cuDNN's fused attention failed on an H100 (torch 2.x, `mha_graph.execute(...).is_good()`) for the masked prefix
# attention at some batch sizes (25 envs in `gsrl eval`); the efficient and flash kernels serve the same masks.
torch.backends.cuda.enable_cudnn_sdp(False)


def gemma_config(stream: StreamConfig, vocab_size: int, rope_theta: float, eps: float) -> GemmaConfig:
    """A ``transformers.GemmaConfig`` for one stream (used for GemmaMLP and the rotary embedding)."""
    return GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=stream.width,
        intermediate_size=stream.mlp_dim,
        num_hidden_layers=stream.depth,
        num_attention_heads=stream.num_heads,
        num_key_value_heads=stream.num_kv_heads,
        head_dim=stream.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )


class AdaptiveRMSNorm(nn.Module):
    """pi0.5 adaRMS: y = rms_norm(x) (1 + scale) + shift, with (scale, shift, gate) = dense(cond).

    ``dense`` is zero-initialised (openpi), so a fresh expert starts as identity residual blocks and its
    time dependence is learned. Computed in float32 and cast back, like GemmaRMSNorm.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, L, W], cond [B, Wc] -> (y [B, L, W] in x's dtype, gate [B, 1, W])."""
        modulation = self.dense(cond.to(self.dense.weight.dtype)).float().unsqueeze(1)
        scale, shift, gate = modulation.chunk(3, dim=-1)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + scale) + shift).to(x.dtype), gate.to(x.dtype)


def _make_norm(width: int, cond_dim: int | None, eps: float) -> nn.Module:
    """adaRMS in the action expert (``cond_dim`` set), Gemma's plain (1 + w) RMSNorm in the LM."""
    return AdaptiveRMSNorm(width, cond_dim, eps) if cond_dim is not None else GemmaRMSNorm(width, eps)


class AttentionProjections(nn.Module):
    """Gemma's q/k/v/o projections (no biases); q is heads x head_dim wide whatever the stream width."""

    def __init__(self, stream: StreamConfig) -> None:
        super().__init__()
        inner = stream.num_heads * stream.head_dim
        kv = stream.num_kv_heads * stream.head_dim
        self.q_proj = nn.Linear(stream.width, inner, bias=False)
        self.k_proj = nn.Linear(stream.width, kv, bias=False)
        self.v_proj = nn.Linear(stream.width, kv, bias=False)
        self.o_proj = nn.Linear(inner, stream.width, bias=False)


class DecoderLayer(nn.Module):
    """One stream's weights for one layer; the attention itself is computed jointly by ``joint_layer``."""

    def __init__(self, stream: StreamConfig, gemma: GemmaConfig, cond_dim: int | None) -> None:
        super().__init__()
        eps = gemma.rms_norm_eps
        self.adaptive = cond_dim is not None
        self.input_layernorm = _make_norm(stream.width, cond_dim, eps)
        self.self_attn = AttentionProjections(stream)
        self.post_attention_layernorm = _make_norm(stream.width, cond_dim, eps)
        self.mlp = GemmaMLP(gemma)

    def apply_norm(self, which: nn.Module, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(normed x, residual gate or None) for one of this layer's two norms."""
        if self.adaptive:
            if cond is None:
                raise ValueError("the action expert's adaptive norms need the time condition")
            return which(x, cond)
        return which(x), None


class GemmaStream(nn.Module):
    """A stack of ``DecoderLayer``s + final norm (+ token embeddings for the LM)."""

    def __init__(
        self, stream: StreamConfig, gemma: GemmaConfig, cond_dim: int | None = None, vocab_size: int | None = None
    ) -> None:
        super().__init__()
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, stream.width)
        self.layers = nn.ModuleList([DecoderLayer(stream, gemma, cond_dim) for _ in range(stream.depth)])
        self.norm = _make_norm(stream.width, cond_dim, gemma.rms_norm_eps)

    def final_norm(self, x: Tensor, cond: Tensor | None) -> Tensor:
        """The stream's last norm (its gate, if adaptive, is discarded as in openpi)."""
        if isinstance(self.norm, AdaptiveRMSNorm):
            if cond is None:
                raise ValueError("the action expert's final norm needs the time condition")
            return self.norm(x, cond)[0]
        return self.norm(x)


def init_stream_weights(module: nn.Module, std: float = 0.02) -> None:
    """Gemma's initializer_range for projections and embeddings; adaRMS Dense stays zero."""
    for sub in module.modules():
        if isinstance(sub, AdaptiveRMSNorm):
            continue
        if isinstance(sub, AttentionProjections | GemmaMLP):
            for lin in sub.children():
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, std=std)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)


@dataclass
class StreamInput:
    """One stream's share of a joint layer: its layer weights, hidden states [B, L, W], time cond, RoPE."""

    layer: DecoderLayer
    hidden: Tensor
    cond: Tensor | None
    cos: Tensor  # [B, L, head_dim]
    sin: Tensor  # [B, L, head_dim]


def joint_layer(
    streams: list[StreamInput],
    attn_mask: Tensor,
    past_kv: tuple[Tensor, Tensor] | None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """One transformer layer over the concatenation of ``streams`` (queries) and ``past_kv`` + streams (keys).

    ``attn_mask`` [B, 1, Lq, Lk] bool (True = may attend), Lq = sum of stream lengths, Lk = past + Lq.
    ``past_kv`` = cached (k, v) [B, kv_heads, P, head_dim] of a prefix (already rotated). Returns the new
    hidden states per stream and each stream's rotated (k, v) for caching.
    """
    qs, ks, vs, gates = [], [], [], []
    for s in streams:
        batch, length, _ = s.hidden.shape
        normed, gate = s.layer.apply_norm(s.layer.input_layernorm, s.hidden, s.cond)
        attn = s.layer.self_attn
        q = attn.q_proj(normed).view(batch, length, num_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, s.cos.to(q.dtype), s.sin.to(q.dtype))
        qs.append(q)
        ks.append(k)
        vs.append(v)
        gates.append(gate)
    dtype = qs[0].dtype
    past_k = [past_kv[0].to(dtype)] if past_kv is not None else []
    past_v = [past_kv[1].to(dtype)] if past_kv is not None else []
    query = torch.cat([q.to(dtype) for q in qs], dim=2)
    key = repeat_kv(torch.cat(past_k + [k.to(dtype) for k in ks], dim=2), num_heads // num_kv_heads)
    value = repeat_kv(torch.cat(past_v + [v.to(dtype) for v in vs], dim=2), num_heads // num_kv_heads)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=head_dim**-0.5)
    out = out.transpose(1, 2).flatten(2)  # [B, Lq, heads * head_dim]

    hiddens = []
    start = 0
    for s, gate in zip(streams, gates, strict=True):
        length = s.hidden.shape[1]
        part = out[:, start : start + length]
        start += length
        attn_out = s.layer.self_attn.o_proj(part.to(s.layer.self_attn.o_proj.weight.dtype))
        h = s.hidden + (attn_out * gate if gate is not None else attn_out).to(s.hidden.dtype)
        normed, gate2 = s.layer.apply_norm(s.layer.post_attention_layernorm, h, s.cond)
        mlp_out = s.layer.mlp(normed)
        hiddens.append(h + (mlp_out * gate2 if gate2 is not None else mlp_out).to(h.dtype))
    return hiddens, list(zip(ks, vs, strict=True))

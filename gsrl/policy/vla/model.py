"""The pi0.5-layout VLA network: SigLIP + Gemma LM prefix, a Gemma action expert with shared attention.

Sequence layout [openpi pi0.py]: prefix = [image tokens (SigLIP -> linear projector, unscaled) | prompt
tokens (embedding x sqrt(width), right-padded)], bidirectional over its valid tokens; suffix = the H noisy
action tokens (action_in_proj of x_t), which attend to the valid prefix and to each other (not causally).
Flow time enters the expert only through adaRMS (time sin/cos embedding -> time_mlp_in -> swish ->
time_mlp_out -> swish). RoPE positions run over valid tokens: prefix cumsum(valid) - 1, suffix continues
from the number of valid prefix tokens.

Because the prefix never attends to the suffix, its per-layer keys/values do not depend on x_t or t:
``encode_prefix`` computes them once per observation and ``predict_velocity`` reuses them at every
denoising step (and, in training, for every stored step of the chain). ``forward_joint`` is the
uncached single pass over prefix + suffix (flow-matching SFT, and the reference the cache is tested
against). The value head reads the mean of the LM's final-normed prefix outputs over valid tokens
(RLinf ``value_after_vlm``/``mean_token``; RLinf averages over a fixed mask that includes padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding

from gsrl.policy.vla.config import VLAConfig
from gsrl.policy.vla.layers import GemmaStream, StreamInput, gemma_config, init_stream_weights, joint_layer


def posemb_sincos(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """Flow time t [B] -> [B, dim] float32: [sin(2 pi t / p), cos(2 pi t / p)], periods geometric in [min, max].

    float64 where the device supports it, as openpi does, so the smallest periods stay accurate.
    """
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.to(dtype)[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).float()


def _fp32(device: torch.device) -> torch.autocast:
    """Leave autocast for small heads whose outputs feed log-probabilities and values."""
    return torch.autocast(device_type=device.type, enabled=False)


class ValueHead(nn.Module):
    """RLinf value MLP: Linear/ReLU stack -> 1 (kaiming fan_out for hidden layers, N(0, 0.02) last)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden:
            lin = nn.Linear(in_dim, size)
            nn.init.kaiming_normal_(lin.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.ReLU()]
            in_dim = size
        last = nn.Linear(in_dim, 1)
        nn.init.normal_(last.weight, std=0.02)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, pooled: Tensor) -> Tensor:
        """[B, W] -> [B] float32, computed outside autocast."""
        with _fp32(pooled.device):
            return self.mlp(pooled.to(self.mlp[0].weight.dtype)).float().squeeze(-1)


class NoiseHead(nn.Module):
    """Flow-Noise std head (RLinf ExploreNoiseNet): expert outputs [B, H, We] -> logits [B, H, D], tanh between."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), nn.Tanh()]
            in_dim = size
        self.mlp_logvar = nn.Sequential(*layers, nn.Linear(in_dim, out_dim))

    def forward(self, suffix_out: Tensor) -> Tensor:
        with _fp32(suffix_out.device):
            return self.mlp_logvar(suffix_out.to(self.mlp_logvar[0].weight.dtype)).float()


@dataclass
class PrefixCache:
    """Per-layer rotated keys/values of the prefix, reused by every denoising step."""

    keys: list[Tensor]  # depth x [B, kv_heads, P, head_dim]
    values: list[Tensor]  # depth x [B, kv_heads, P, head_dim]
    valid: Tensor  # [B, P] bool: real (non-padding) prefix tokens
    hidden: Tensor  # [B, P, W_lm] final-normed LM outputs (value head input)

    @property
    def num_valid(self) -> Tensor:
        return self.valid.sum(dim=1)

    def repeat_interleave(self, repeats: int) -> PrefixCache:
        """Each row repeated ``repeats`` times (row b -> rows b*r .. b*r+r-1): several chain steps per observation."""
        if repeats == 1:
            return self
        rep = lambda x: x.repeat_interleave(repeats, dim=0)  # noqa: E731
        return PrefixCache(
            [rep(k) for k in self.keys], [rep(v) for v in self.values], rep(self.valid), rep(self.hidden)
        )


class VLAModel(nn.Module):
    """The network; ``config`` must be resolved (``VLAConfig.resolve``) so action sizes are known."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        if config.action_dim is None or config.action_horizon is None:
            raise ValueError("VLAModel needs a resolved config (VLAConfig.resolve(action_dim, action_chunk))")
        config.validate()
        self.config = config
        vis, lm, ex = config.vision, config.language, config.expert
        vision_config = SiglipVisionConfig(
            hidden_size=vis.width,
            intermediate_size=vis.mlp_dim,
            num_hidden_layers=vis.depth,
            num_attention_heads=vis.num_heads,
            image_size=vis.image_size,
            patch_size=vis.patch_size,
            vision_use_head=False,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        )
        vision_config._attn_implementation = "sdpa"
        self.vision_tower = SiglipVisionModel(vision_config)
        self.multi_modal_projector = nn.Linear(vis.width, lm.width)
        lm_gemma = gemma_config(lm, config.vocab_size, config.rope_theta, config.rms_norm_eps)
        ex_gemma = gemma_config(ex, config.vocab_size, config.rope_theta, config.rms_norm_eps)
        self.language_model = GemmaStream(lm, lm_gemma, vocab_size=config.vocab_size)
        self.action_expert = GemmaStream(ex, ex_gemma, cond_dim=ex.width)
        init_stream_weights(self.language_model)
        init_stream_weights(self.action_expert)
        self.rotary_emb = GemmaRotaryEmbedding(lm_gemma)  # non-persistent buffers only
        self.action_in_proj = nn.Linear(config.action_dim, ex.width)
        self.action_out_proj = nn.Linear(ex.width, config.action_dim)
        self.time_mlp_in = nn.Linear(ex.width, ex.width)
        self.time_mlp_out = nn.Linear(ex.width, ex.width)
        self.value_head = ValueHead(lm.width, config.value_hidden)
        self.noise_head = NoiseHead(ex.width, config.noise_hidden, config.action_dim) if config.noise_head else None

    # ---- prefix -------------------------------------------------------------------------------------

    def embed_prefix(self, images: Tensor, tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, n, 3, S, S] float in [-1, 1], tokens/mask [B, L] -> (embeddings [B, P, W_lm], valid [B, P]).

        Image tokens are not scaled; text embeddings are multiplied by sqrt(W_lm) (openpi's target, done
        here explicitly because the layers run manually).
        """
        batch, num_images = images.shape[:2]
        pixels = images.flatten(0, 1)
        features = self.vision_tower(pixel_values=pixels).last_hidden_state  # [B * n, T, W_vis]
        image_emb = self.multi_modal_projector(features).reshape(batch, -1, self.config.language.width)
        text_emb = self.language_model.embed_tokens(tokens) * math.sqrt(self.config.language.width)
        embeddings = torch.cat([image_emb, text_emb.to(image_emb.dtype)], dim=1)
        image_valid = torch.ones(batch, image_emb.shape[1], dtype=torch.bool, device=tokens.device)
        return embeddings, torch.cat([image_valid, token_mask.bool()], dim=1)

    def _rope(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE (cos, sin) [B, L, head_dim] for positions [B, L]; base 10000 as Gemma."""
        return self.rotary_emb(hidden, positions)

    def encode_prefix(self, images: Tensor, tokens: Tensor, token_mask: Tensor) -> PrefixCache:
        """Run the LM over the prefix once; keep each layer's rotated K/V and the final-normed outputs."""
        lm = self.config.language
        hidden, valid = self.embed_prefix(images, tokens, token_mask)
        positions = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
        cos, sin = self._rope(hidden, positions)
        mask = _prefix_mask(valid)
        keys, values = [], []
        for layer in self.language_model.layers:
            (hidden,), ((k, v),) = joint_layer(
                [StreamInput(layer, hidden, None, cos, sin)], mask, None, lm.num_heads, lm.num_kv_heads, lm.head_dim
            )
            keys.append(k)
            values.append(v)
        return PrefixCache(keys, values, valid, self.language_model.final_norm(hidden, None))

    def value(self, cache: PrefixCache) -> Tensor:
        """V(s) [B] float32 from the mean of valid prefix outputs."""
        weights = cache.valid.unsqueeze(-1).to(torch.float32)
        pooled = (cache.hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.value_head(pooled)

    # ---- suffix -------------------------------------------------------------------------------------

    def time_condition(self, t: Tensor) -> Tensor:
        """Flow time [B] -> adaRMS condition [B, W_ex]."""
        ex = self.config.expert
        emb = posemb_sincos(t, ex.width, self.config.time_min_period, self.config.time_max_period)
        hidden = F.silu(self.time_mlp_in(emb.to(self.time_mlp_in.weight.dtype)))
        return F.silu(self.time_mlp_out(hidden))

    def _velocity_out(self, suffix_out: Tensor) -> Tensor:
        """action_out_proj in float32 (openpi), [B, H, W_ex] -> [B, H, D]."""
        with _fp32(suffix_out.device):
            return self.action_out_proj(suffix_out.to(self.action_out_proj.weight.dtype)).float()

    def predict_velocity(self, cache: PrefixCache, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """v(x_t, t) [B, H, D] float32 and the expert's final-normed outputs [B, H, W_ex], with the cached prefix."""
        lm = self.config.language
        cond = self.time_condition(t)
        hidden = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        horizon = x_t.shape[1]
        positions = cache.num_valid[:, None] + torch.arange(horizon, device=x_t.device)[None, :]
        cos, sin = self._rope(hidden, positions)
        mask = _suffix_mask(cache.valid, horizon)
        for i, layer in enumerate(self.action_expert.layers):
            (hidden,), _ = joint_layer(
                [StreamInput(layer, hidden, cond, cos, sin)],
                mask,
                (cache.keys[i], cache.values[i]),
                lm.num_heads,
                lm.num_kv_heads,
                lm.head_dim,
            )
        suffix_out = self.action_expert.final_norm(hidden, cond)
        return self._velocity_out(suffix_out), suffix_out

    def noise_logits(self, suffix_out: Tensor) -> Tensor:
        """Flow-Noise head logits [B, H, D] float32 (``flow.noise_std_from_logits`` maps them to a std)."""
        if self.noise_head is None:
            raise RuntimeError("this model was built without a noise head (config.noise_head=False)")
        return self.noise_head(suffix_out)

    def forward_joint(
        self, images: Tensor, tokens: Tensor, token_mask: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Uncached single pass over prefix + suffix: (v [B, H, D], suffix_out [B, H, W_ex], values [B])."""
        lm = self.config.language
        prefix, valid = self.embed_prefix(images, tokens, token_mask)
        cond = self.time_condition(t)
        suffix = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        horizon = x_t.shape[1]
        prefix_pos = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
        suffix_pos = valid.sum(1, keepdim=True) + torch.arange(horizon, device=x_t.device)[None, :]
        p_cos, p_sin = self._rope(prefix, prefix_pos)
        s_cos, s_sin = self._rope(suffix, suffix_pos)
        mask = _joint_mask(valid, horizon)
        for lm_layer, ex_layer in zip(self.language_model.layers, self.action_expert.layers, strict=True):
            (prefix, suffix), _ = joint_layer(
                [StreamInput(lm_layer, prefix, None, p_cos, p_sin), StreamInput(ex_layer, suffix, cond, s_cos, s_sin)],
                mask,
                None,
                lm.num_heads,
                lm.num_kv_heads,
                lm.head_dim,
            )
        suffix_out = self.action_expert.final_norm(suffix, cond)
        cache_like = PrefixCache([], [], valid, self.language_model.final_norm(prefix, None))
        return self._velocity_out(suffix_out), suffix_out, self.value(cache_like)


def _prefix_mask(valid: Tensor) -> Tensor:
    """[B, 1, P, P]: valid tokens attend to all valid tokens; padding attends to itself only (no empty rows)."""
    mask = valid[:, None, :] & valid[:, :, None]
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    return (mask | eye).unsqueeze(1)


def _joint_mask(valid: Tensor, horizon: int) -> Tensor:
    """[B, 1, P + H, P + H]: the prefix block (which never sees the suffix) above the suffix rows."""
    prefix_rows = _prefix_mask(valid)
    hidden_suffix = prefix_rows.new_zeros(valid.shape[0], 1, valid.shape[1], horizon)
    return torch.cat([torch.cat([prefix_rows, hidden_suffix], dim=3), _suffix_mask(valid, horizon)], dim=2)


def _suffix_mask(valid: Tensor, horizon: int) -> Tensor:
    """[B, 1, H, P + H]: action tokens see the valid prefix and every action token."""
    batch = valid.shape[0]
    prefix = valid[:, None, :].expand(batch, horizon, valid.shape[1])
    suffix = torch.ones(batch, horizon, horizon, dtype=torch.bool, device=valid.device)
    return torch.cat([prefix, suffix], dim=2).unsqueeze(1)

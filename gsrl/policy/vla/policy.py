"""``VLAPolicy``: the pi0.5-layout VLA behind the ``Policy`` interface, with Flow-SDE / Flow-Noise log-probs.

``act`` encodes the prefix once (KV cache), integrates the flow from x_1 ~ N(0, I) in N steps, makes the
chosen steps stochastic, and returns the executed chunk ``x_0[:, :C, :A]`` clipped to [-1, 1] (the env maps
it to its controller's units) with the chain's log-prob and V(s). The chain itself goes into
``PolicyOutput.extras``:

- ``chain`` [B, N + 1, H, D] float32: x_1, x_{t_1}, ..., x_0 (unclipped);
- ``stochastic_steps`` [B, N] bool: which transitions were Gaussian (the same count per row).

``evaluate_actions(..., extras=...)`` re-runs the expert only at the stored stochastic steps, on the stored
x_t, under the current weights; all of a row's steps go through the expert as one batch against the
repeated prefix cache. ``action_chunk`` is not needed then (it is a function of the chain).

``compile_mode`` (opt-in) runs the model's prefix, velocity and joint passes ``torch.compile``d with static shapes;
``act`` and ``value`` then pad their batch to a bucket (``gsrl.policy.vla.compile`` says why and how).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from gsrl.checkpoint_files import WEIGHTS_FILE
from gsrl.policy.base import ObservationSpec, Policy, PolicyOutput, load_model_weights
from gsrl.policy.vla import flow
from gsrl.policy.vla.compile import DEFAULT_MAX_BATCH, CompiledVLA, batch_bucket, check_compile_mode, pad_rows
from gsrl.policy.vla.config import VLAConfig, vla_config
from gsrl.policy.vla.inputs import StateNormalizer, default_image_keys, default_state_keys, preprocess_images
from gsrl.policy.vla.model import PrefixCache, VLAModel
from gsrl.policy.vla.tokenizer import ByteTokenizer, discretize_state

EXTRA_CHAIN = "chain"
EXTRA_STOCHASTIC = "stochastic_steps"
CHECKPOINT_CONFIG = "vla_config.json"
CHECKPOINT_TOKENIZER = "tokenizer.json"


class VLAPolicy(Policy):
    """pi0.5-style VLA policy (registry kind ``"vla"``).

    Options (all from the run config's policy kwargs):
    - ``preset`` (tiny | small | pi05) and ``config_overrides`` (top-level ``VLAConfig`` fields);
    - ``image_keys`` / ``state_keys``: observation entries used (default: every uint8 [H, W, 3] / float32 [D]);
    - ``noise_method`` (flow_sde | flow_noise), ``num_denoise_steps`` (RL recipes: 4 or 5), ``noise_level``
      (Flow-SDE's a), ``noise_std_range`` (Flow-Noise std bounds), ``joint_logprob`` (all steps stochastic;
      default True for flow_noise, False for flow_sde = one uniformly drawn SDE step per row),
      ``chain_reduction`` (``sum`` = the chain's log-density; ``mean`` = RLinf's joint average);
    - ``discrete_state_input``: the state as 256-bin tokens in the prompt (pi0.5); ``state_low``/``state_high``:
      raw-state bounds mapped to [-1, 1] before binning (stored as buffers, overwritten by checkpoints);
    - ``checkpoint``: a local directory (``model.safetensors`` [+ ``vla_config.json``]) or ``.safetensors`` file,
      native or LeRobot pi0.5 names; ``train_expert_only`` freezes SigLIP, projector and LM (RLinf default);
    - ``bf16_autocast``: bfloat16 autocast on CUDA (flow arithmetic, heads and log-probs stay float32);
    - ``compile_mode``: "" (eager) or a ``torch.compile`` mode (default | reduce-overhead |
      max-autotune-no-cudagraphs) for the model's three hot passes, static shapes; ``act``/``value`` then pad
      batches to powers of two up to ``compile_max_batch`` (set it to the policy server's ``max_batch_size``).
    """

    def __init__(
        self,
        observation_spec: ObservationSpec,
        action_dim: int,
        action_chunk: int,
        preset: str = "tiny",
        config_overrides: dict[str, Any] | None = None,
        image_keys: Sequence[str] | None = None,
        state_keys: Sequence[str] | None = None,
        noise_method: str = "flow_sde",
        num_denoise_steps: int = 5,
        noise_level: float = 0.5,
        noise_std_range: Sequence[float] | None = None,
        joint_logprob: bool | None = None,
        chain_reduction: str = "sum",
        discrete_state_input: bool = True,
        state_low: Sequence[float] | None = None,
        state_high: Sequence[float] | None = None,
        checkpoint: str | None = None,
        train_expert_only: bool = False,
        bf16_autocast: bool = True,
        clip_actions: bool = True,
        eval_seed: int = 0,
        compile_mode: str = "",
        compile_max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        super().__init__()
        check_compile_mode(compile_mode)
        if compile_max_batch < 1:
            raise ValueError(f"compile_max_batch={compile_max_batch} must be >= 1")
        if noise_method not in flow.NOISE_METHODS:
            raise ValueError(f"noise_method={noise_method!r}; known: {flow.NOISE_METHODS}")
        if chain_reduction not in ("sum", "mean"):
            raise ValueError(f"chain_reduction={chain_reduction!r}; use 'sum' or 'mean'")
        if num_denoise_steps < 1:
            raise ValueError(f"num_denoise_steps={num_denoise_steps} must be >= 1")
        self.action_dim = action_dim
        self.action_chunk = action_chunk
        self.image_keys = list(image_keys) if image_keys is not None else default_image_keys(observation_spec)
        self.state_keys = list(state_keys) if state_keys is not None else default_state_keys(observation_spec)
        for key in self.image_keys + self.state_keys:
            if key not in observation_spec:
                raise ValueError(f"observation_spec has no {key!r} key (has {sorted(observation_spec)})")
        if not self.image_keys:
            raise ValueError(
                f"no image keys: the VLA needs at least one uint8 [H, W, 3] entry in {sorted(observation_spec)}"
            )
        self.noise_method = noise_method
        self.num_denoise_steps = num_denoise_steps
        self.noise_level = float(noise_level)
        self.joint_logprob = (noise_method == "flow_noise") if joint_logprob is None else bool(joint_logprob)
        self.chain_reduction = chain_reduction
        self.discrete_state_input = discrete_state_input and bool(self.state_keys)
        self.train_expert_only = train_expert_only
        self.bf16_autocast = bf16_autocast
        self.clip_actions = clip_actions
        self.eval_seed = eval_seed

        overrides = dict(config_overrides or {})
        overrides["noise_head"] = noise_method == "flow_noise"
        if noise_std_range is not None:
            overrides["noise_std_range"] = tuple(float(s) for s in noise_std_range)
        ckpt_dir = _checkpoint_dir(checkpoint)
        if ckpt_dir is not None and (ckpt_dir / CHECKPOINT_CONFIG).exists():
            saved = VLAConfig.from_dict(json.loads((ckpt_dir / CHECKPOINT_CONFIG).read_text()))
            config = _replace(saved, overrides)
        else:
            config = vla_config(preset, **overrides)
        self.config = config.resolve(action_dim, action_chunk)
        self.tokenizer = (
            ByteTokenizer.load(ckpt_dir / CHECKPOINT_TOKENIZER)
            if ckpt_dir is not None and (ckpt_dir / CHECKPOINT_TOKENIZER).exists()
            else ByteTokenizer()
        )
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"tokenizer vocab {self.tokenizer.vocab_size} > model vocab_size {self.config.vocab_size}")
        state_dim = sum(observation_spec[k][0][0] for k in self.state_keys)
        self.state_norm = StateNormalizer(max(state_dim, 1), state_low, state_high)
        self.model = VLAModel(self.config)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        if train_expert_only:
            for module in (self.model.vision_tower, self.model.multi_modal_projector, self.model.language_model):
                module.requires_grad_(False)
        self.compile_max_batch = compile_max_batch
        # Pad act/value batches to a bucket (one compiled graph per bucket); on with compilation, settable for tests.
        self.pad_batches = bool(compile_mode)
        self._compiled = CompiledVLA(self.model, compile_mode) if compile_mode else None

    # ---- inputs -------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.model.action_in_proj.weight.device

    def _passes(self) -> Any:
        """Where ``encode_prefix`` / ``predict_velocity`` / ``forward_joint`` run: compiled or the model itself.

        Marks the start of a policy call (a new CUDA-graph generation under ``reduce-overhead``), so call it once
        per entry point, before the first pass.
        """
        if self._compiled is None:
            return self.model
        self._compiled.step_begin()
        return self._compiled

    def _bucket(self, batch: int) -> int:
        return batch_bucket(batch, self.compile_max_batch) if self.pad_batches and batch > 0 else batch

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.bf16_autocast and device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model_inputs(
        self, observations: dict[str, Tensor], instructions: list[str] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(images [B, n, 3, S, S] in [-1, 1], tokens [B, L], token_mask [B, L]) on the model's device."""
        device = self._device()
        size = self.config.vision.image_size
        images = torch.stack([preprocess_images(observations[key].to(device), size) for key in self.image_keys], dim=1)
        batch = images.shape[0]
        bins = None
        if self.discrete_state_input:
            state = torch.cat([observations[key].to(device).float().reshape(batch, -1) for key in self.state_keys], 1)
            bins = discretize_state(self.state_norm(state))
        texts = list(instructions) if instructions is not None else [""] * batch
        if len(texts) != batch:
            raise ValueError(f"{len(texts)} instructions for {batch} observations")
        tokens, mask = self.tokenizer.encode_batch(texts, bins, self.config.max_token_len)
        return images, tokens.to(device), mask.to(device)

    def encode(self, observations: dict[str, Tensor], instructions: list[str] | None) -> PrefixCache:
        """The prefix KV cache; without grad into the VLM when it is frozen (saves its activations)."""
        return self._encode(observations, instructions, self._passes())

    def _encode(
        self, observations: dict[str, Tensor], instructions: list[str] | None, passes: Any, pad: bool = False
    ) -> PrefixCache:
        """``encode`` through ``passes`` (from ``_passes()``); with ``pad``, its rows padded to ``_bucket(B)`` by
        repeating the last one (the cache then has more rows than ``observations``: slice what is read from it)."""
        images, tokens, mask = self.model_inputs(observations, instructions)
        if pad:
            rows = self._bucket(images.shape[0])
            images, tokens, mask = (pad_rows(x, rows) for x in (images, tokens, mask))
        frozen = self.train_expert_only or not torch.is_grad_enabled()
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return passes.encode_prefix(images, tokens, mask)

    def _velocity_fn(self, cache: PrefixCache, passes: Any, batch: int) -> flow.VelocityFn:
        """v(x_t, t) on ``batch`` rows against ``cache``, whose rows may be padded past ``batch`` (see ``encode``)."""
        rows = cache.valid.shape[0]

        def velocity(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
            v, suffix_out = passes.predict_velocity(cache, pad_rows(x_t, rows), pad_rows(t, rows))
            return v[:batch], self._noise_std(suffix_out[:batch])

        return velocity

    def _noise_std(self, suffix_out: Tensor) -> Tensor | None:
        if self.noise_method != "flow_noise":
            return None
        return flow.noise_std_from_logits(self.model.noise_logits(suffix_out), self.config.noise_std_range)

    # ---- Policy interface ---------------------------------------------------------------------------

    @torch.no_grad()
    def act(
        self,
        observations: dict[str, Tensor],
        instructions: list[str] | None = None,
        deterministic: bool = False,
    ) -> PolicyOutput:
        device = self._device()
        cfg = self.config
        passes = self._passes()
        batch = _batch_size(observations, self.image_keys[0])
        with self._autocast(device):
            cache = self._encode(observations, instructions, passes, pad=True)
            values = self.model.value(cache)[:batch]
            shape = (batch, cfg.action_horizon, cfg.action_dim)
            generator = torch.Generator(device=device).manual_seed(self.eval_seed) if deterministic else None
            x1 = torch.randn(shape, device=device, generator=generator)
            if deterministic:  # pure ODE from a fixed-seed x_1: reproducible evaluation
                stochastic = torch.zeros(batch, self.num_denoise_steps, dtype=torch.bool, device=device)
            else:
                stochastic = flow.stochastic_step_mask(batch, self.num_denoise_steps, self.joint_logprob, device)
            velocity = self._velocity_fn(cache, passes, batch)
            sample = flow.sample_chain(
                velocity, x1, self.num_denoise_steps, stochastic, self.noise_method, self.noise_level
            )
        if deterministic:
            logprobs = torch.zeros(batch, device=device)  # a deterministic map has no density
        else:
            steps = flow.transition_logprob(
                sample.chain[:, 1:], sample.means, sample.stds, self.action_chunk, self.action_dim
            )  # [B, N], 0 on ODE steps
            logprobs = self._reduce(steps[stochastic].view(batch, -1), sample.chain[:, 0])
        action_chunk = sample.actions[:, : self.action_chunk, : self.action_dim]
        if self.clip_actions:
            action_chunk = action_chunk.clamp(-1.0, 1.0)
        return PolicyOutput(
            action_chunk=action_chunk.float(),
            logprobs=logprobs.float(),
            values=values.float(),
            extras={EXTRA_CHAIN: sample.chain.float(), EXTRA_STOCHASTIC: stochastic},
        )

    def evaluate_actions(
        self,
        observations: dict[str, Tensor],
        action_chunk: Tensor,
        instructions: list[str] | None = None,
        extras: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Log-prob, entropy and value of the stored chains under the current weights, with grad.

        Needs ``extras`` from ``act`` (``chain``, ``stochastic_steps``); ``action_chunk`` is implied by the chain.
        """
        if extras is None or EXTRA_CHAIN not in extras or EXTRA_STOCHASTIC not in extras:
            raise ValueError(
                f"VLAPolicy.evaluate_actions needs the rollout's extras {EXTRA_CHAIN!r} and {EXTRA_STOCHASTIC!r} "
                "(a flow policy's log-prob is that of its denoising chain, not of the final action)"
            )
        device = self._device()
        chain = extras[EXTRA_CHAIN].to(device=device, dtype=torch.float32)
        stochastic = extras[EXTRA_STOCHASTIC].to(device=device, dtype=torch.bool)
        batch, num_steps = stochastic.shape
        if chain.shape != (batch, num_steps + 1, self.config.action_horizon, self.config.action_dim):
            raise ValueError(
                f"extras chain has shape {list(chain.shape)} for stochastic_steps {list(stochastic.shape)}"
            )
        # Not padded (pad rows would enter the losses): constant minibatch sizes compile once.
        passes = self._passes()
        counts = stochastic.sum(dim=1)
        per_row = int(counts[0]) if batch else 0
        if bool((counts != per_row).any()):
            raise ValueError("every row must have the same number of stochastic steps")
        with self._autocast(device):
            cache = self._encode(observations, instructions, passes)
            values = self.model.value(cache)
            if per_row == 0:  # deterministic chains carry no log-prob
                zeros = values.new_zeros(batch)
                return zeros, zeros, values
            step_index = stochastic.nonzero()[:, 1].view(batch, per_row)  # [B, S]
            rows = torch.arange(batch, device=device)[:, None]
            x_t = chain[rows, step_index].flatten(0, 1)  # [B * S, H, D]
            x_next = chain[rows, step_index + 1].flatten(0, 1)
            timesteps = flow.denoise_timesteps(num_steps, device=device)
            t = timesteps[step_index].flatten()
            dt = (timesteps[step_index] - timesteps[step_index + 1]).flatten()
            v, suffix_out = passes.predict_velocity(cache.repeat_interleave(per_row), x_t, t)
            noise_std = self._noise_std(suffix_out)
        mean, std = flow.transition(self.noise_method, x_t, v.float(), t, dt, self.noise_level, noise_std)
        step_logp = flow.transition_logprob(x_next, mean, std, self.action_chunk, self.action_dim).view(batch, per_row)
        step_ent = flow.transition_entropy(std, self.action_chunk, self.action_dim).view(batch, per_row)
        logprobs = self._reduce(step_logp, chain[:, 0])
        prior_entropy = torch.full_like(
            logprobs, self.action_chunk * self.action_dim * (0.5 + 0.5 * math.log(2 * math.pi))
        )
        entropy = flow.reduce_chain(step_ent, self.chain_reduction, prior_entropy)
        return logprobs, entropy, values.float()

    @torch.no_grad()
    def value(self, observations: dict[str, Tensor], instructions: list[str] | None = None) -> Tensor:
        passes = self._passes()
        batch = _batch_size(observations, self.image_keys[0])
        with self._autocast(self._device()):
            return self.model.value(self._encode(observations, instructions, passes, pad=True))[:batch].float()

    def critic_parameters(self) -> list[nn.Parameter]:
        """The value head (``model.value_head``). It reads the LM's prefix outputs, which the actor's denoising
        attends to as well, so SigLIP, projector and LM stay with the actor; so does Flow-Noise's noise head."""
        return list(self.model.value_head.parameters())

    def _reduce(self, step_logp: Tensor, x1: Tensor) -> Tensor:
        prior = flow.standard_normal_logprob(x1, self.action_chunk, self.action_dim)
        return flow.reduce_chain(step_logp, self.chain_reduction, prior)

    # ---- supervised stage ---------------------------------------------------------------------------

    def flow_matching_loss(
        self,
        observations: dict[str, Tensor],
        actions: Tensor,
        instructions: list[str] | None = None,
        time_distribution: str = "beta",
    ) -> Tensor:
        """pi0's SFT loss: mean over [B, H, D] of (v(x_t, t) - (noise - actions))^2, one joint pass.

        ``actions`` [B, H, A] normalized to [-1, 1] (H = the model's horizon); padded to D with zeros as openpi
        pads to 32, and the padded dims are trained toward zero velocity targets too. Not batch-padded under
        ``compile_mode``: a constant batch size compiles once.
        """
        cfg = self.config
        device = self._device()
        batch, horizon, adim = actions.shape
        if horizon != cfg.action_horizon or adim > cfg.action_dim:
            raise ValueError(
                f"actions {list(actions.shape)} do not fit the model's [H={cfg.action_horizon}, D={cfg.action_dim}]"
            )
        padded = torch.zeros(batch, horizon, cfg.action_dim, device=device)
        padded[..., :adim] = actions.to(device=device, dtype=torch.float32)
        noise = torch.randn_like(padded)
        t = flow.sample_flow_time(batch, time_distribution, device=device)
        x_t, target = flow.flow_matching_targets(padded, noise, t)
        with self._autocast(device):
            images, tokens, mask = self.model_inputs(observations, instructions)
            v, _, _ = self._passes().forward_joint(images, tokens, mask, x_t, t)
        return (v.float() - target).pow(2).mean()

    # ---- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` (this policy's state_dict), ``vla_config.json`` and ``tokenizer.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CHECKPOINT_CONFIG).write_text(self.config.to_json() + "\n")
        self.tokenizer.save(directory / CHECKPOINT_TOKENIZER)
        return directory

    def load_checkpoint(self, path: str | Path) -> None:
        """Load native (``save_checkpoint``) or LeRobot/openpi pi0.5 weights; mismatches raise with a full list."""
        from gsrl.policy.vla import lerobot_names

        state = load_model_weights(path)  # model.safetensors or shards (gsrl export)
        if lerobot_names.is_lerobot_state_dict(state):
            lerobot_names.load_lerobot_state_dict(self.model, state)
            return
        lerobot_names.load_checked(
            self,
            state,
            allow_missing=("model.value_head.", "model.noise_head."),
            allow_unexpected=("model.noise_head.",),
        )


def _batch_size(observations: dict[str, Tensor], key: str) -> int:
    return int(observations[key].shape[0])


def _checkpoint_dir(checkpoint: str | None) -> Path | None:
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def _replace(config: VLAConfig, overrides: dict[str, Any]) -> VLAConfig:
    return dataclasses.replace(config, **overrides).validate()

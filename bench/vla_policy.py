"""Row 3b: decisions/s of the VLA in a real policy server, per preset, against its own forward in-process.

The same measurements as the ``policy server`` stage (``bench.policy_server.measure``: Act at batch 1, Rollout at
``vla_envs`` envs from up to 8 concurrent streams, batching efficiency, p50/p99), with the run's VLA settings of
``configs/gs_vla_ppo.yaml``: Flow-SDE, 4 denoising steps, a chunk of 5, bf16 autocast on CUDA, one 224x224 camera
(the preset's image size) plus the 25-D proprioceptive state of GSEnv-PutCubeOnPlate-v0. Observations are random:
the model's cost does not depend on pixel values. ``--full`` times the ``small`` and ``pi05`` presets on a GPU; on a
CPU box the ``tiny`` preset keeps the row alive (its figures say nothing about a GPU).
"""

from __future__ import annotations

import dataclasses
import gc

import torch

from bench.common import Row, Sizes, skipped_row
from bench.policy_server import Workload, measure, serving
from gsrl.env_spec import EnvSpec
from gsrl.policy.vla.config import vla_config
from gsrl.policy.vla.policy import VLAPolicy

STAGE = "VLA policy server"
ACTION_DIM, CHUNK, STATE_DIM = 7, 5, 25
INSTRUCTION = "put the cube on the plate"
CAMERA = "rgb/base_camera"
POLICY_SETTINGS = {"noise_method": "flow_sde", "num_denoise_steps": 4, "noise_level": 0.5}


def workload(preset: str) -> Workload:
    side = vla_config(preset).vision.image_size
    spec = EnvSpec({CAMERA: ((side, side, 3), "uint8"), "state": ((STATE_DIM,), "float32")}, ACTION_DIM, INSTRUCTION)
    return Workload(spec, CHUNK)


def run(sizes: Sizes) -> list[Row]:
    cuda = torch.cuda.is_available()
    presets = sizes.vla_presets if cuda else ("tiny",)
    if sizes.name == "full" and not cuda:
        return [skipped_row(STAGE, "--full times the small and pi05 presets on a GPU, and there is no CUDA device")]
    device = "cuda" if cuda else "cpu"
    # A pi05 forward at batch 64 takes a sizeable fraction of a second: fewer, shorter repeats than the MLP rows.
    sizes = dataclasses.replace(sizes, repeats=min(sizes.repeats, 3), min_time_s=min(sizes.min_time_s, 1.0))
    rows: list[Row] = []
    for preset in presets:
        torch.manual_seed(0)
        load = workload(preset)
        policy = VLAPolicy(load.spec.observation_spec, ACTION_DIM, CHUNK, preset=preset, **POLICY_SETTINGS)
        params = sum(p.numel() for p in policy.parameters()) / 1e6
        policy = policy.to(device).eval()
        prefix = f"{preset} ({params:,.0f}M params, {device}): "
        print(f"bench: VLA {prefix.rstrip(': ')} built", flush=True)
        with serving(policy, load, device=device, max_batch_size=max(sizes.vla_envs)) as address:
            envs, calls, steps = sizes.vla_envs, sizes.vla_act_calls, sizes.vla_rollout_steps
            rows += measure(STAGE, prefix, address, policy, load, sizes, envs, calls, steps)
        del policy
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows

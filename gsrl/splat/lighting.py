"""Diffuse lighting for Gaussians converted from meshes, so their colours match the simulator's lit renders.

Mesh conversion stores each surface's albedo (its colour under full white ambient light). SAPIEN shades the same
surface with the scene's ambient and directional lights, so without lighting a converted scene is brighter and
flatter than the simulator's own camera image. This module applies SAPIEN's diffuse term per Gaussian, using the
disc's normal (the rotated local z axis, outward as the mesh's face): linear albedo x (ambient + sum_i max(0,
n . -d_i) c_i / pi), re-encoded to sRGB. Specular highlights and shadows are not modelled. Scanned scenes (fitted
from real images) already contain their lighting and must not be lit again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gsrl.splat.transforms import quat_to_rotmat


@dataclass(frozen=True)
class SceneLights:
    """``ambient`` [3] linear RGB; ``directions`` [L, 3] unit vectors the light travels along; ``colors`` [L, 3]."""

    ambient: Tensor
    directions: Tensor
    colors: Tensor


def scene_lights(env: Any) -> SceneLights:
    """The ambient and directional lights of a ManiSkill env's (first) sub-scene."""
    import sapien

    sub_scene = env.unwrapped.scene.sub_scenes[0]
    directions, colors = [], []
    for entity in sub_scene.entities:
        for component in entity.components:
            if isinstance(component, sapien.render.RenderDirectionalLightComponent):
                # A SAPIEN directional light shines along its entity's +x axis.
                directions.append(torch.tensor(entity.pose.to_transformation_matrix()[:3, 0], dtype=torch.float32))
                colors.append(torch.tensor(component.color, dtype=torch.float32)[:3])
    ambient = torch.tensor(sub_scene.render_system.ambient_light, dtype=torch.float32)[:3]
    if not directions:
        return SceneLights(ambient, torch.zeros(0, 3), torch.zeros(0, 3))
    d = torch.stack(directions)
    return SceneLights(ambient, d / d.norm(dim=-1, keepdim=True), torch.stack(colors))


def srgb_to_linear(x: Tensor) -> Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: Tensor) -> Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


def disc_normals(quats: Tensor) -> Tensor:
    """World (or local) normals [..., 3] of flat Gaussians: their rotation's third column (the thin axis)."""
    return quat_to_rotmat(torch.nn.functional.normalize(quats, dim=-1))[..., :, 2]


def shade(albedo_srgb: Tensor, normals: Tensor, lights: SceneLights) -> Tensor:
    """Lit sRGB colours [..., 3] of surfaces with sRGB albedo [..., 3] and unit normals [..., 3]."""
    lights = SceneLights(*(t.to(normals.device) for t in (lights.ambient, lights.directions, lights.colors)))
    cosines = (normals @ (-lights.directions).T).clamp_min(0.0)  # [..., L]
    irradiance = lights.ambient + cosines @ lights.colors / torch.pi  # [..., 3]
    return linear_to_srgb(srgb_to_linear(albedo_srgb) * irradiance)

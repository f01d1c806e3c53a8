"""Gaussians for every visual of a ManiSkill scene, one set per rigid body in that body's local frame.

A splat renderer for a simulated scene needs, per body, Gaussians that move with it: this module converts each
body's SAPIEN render shapes (meshes and primitives, with their materials and textures) into flat Gaussians with
``mesh_to_gaussians``, in the body frame, and reads the bodies' world poses each step (``part_world_poses``). The
renderer then places part p's Gaussians with pose p; robot link poses from physics are the forward kinematics of
the current qpos, so no separate kinematic chain is needed.

A converted scene is saved as a directory (one 3DGS PLY per part plus ``scene.json``), so the conversion can be
cached and any part (the table, say) can be replaced by a real scan in the same body frame.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sapien
import torch
from mani_skill.utils.geometry.rotation_conversions import quaternion_to_matrix

from gsrl.splat.gaussians import GaussianSet
from gsrl.splat.mesh_to_gaussians import (
    SurfaceSampling,
    TextureFilter,
    TriangleMesh,
    linear_to_srgb,
    mesh_to_gaussians,
)
from gsrl.splat.ply import load_ply, save_ply

PartKind = Literal["link", "actor"]
MANIFEST_NAME = "scene.json"
MANIFEST_FORMAT = "gsrl-scene-gaussians"
MANIFEST_VERSION = 1
_WRAP_MODES = {"repeat": "repeat", "mirror": "mirror", "edge": "clamp", "border": "clamp"}


@dataclass(frozen=True)
class SceneConversion:
    """Parameters of a scene conversion; densities are Gaussians per m^2 of visual surface.

    Attributes:
        body_density: robot links and dynamic actors, the parts the camera sees up close and moving.
        static_density: static and kinematic actors (the table): a backdrop, so coarser.
        large_density: shapes wider than ``large_shape_size`` (the ground), which are also cropped to ``crop_box``.
        min_count, max_count: per-mesh bounds (see ``SurfaceSampling``).
        large_shape_size: a mesh whose world xy extent exceeds this many m counts as ground-like.
        crop_box: world (x_min, x_max, y_min, y_max) in m for large shapes; None = the xy bounds of all other
            visuals plus ``crop_margin`` (the robot/table region).
        disc_scale, thickness, opacity, texture_filter: as in ``SurfaceSampling``.
        seed: base seed; each mesh's samples are seeded from it, the part name and the mesh index.
    """

    body_density: float = 40_000.0
    static_density: float = 2_000.0
    large_density: float = 1_000.0
    min_count: int = 64
    max_count: int = 20_000
    large_shape_size: float = 10.0
    crop_box: tuple[float, float, float, float] | None = None
    crop_margin: float = 0.5
    disc_scale: float = 0.8
    thickness: float = 1e-4
    opacity: float = 0.99
    texture_filter: TextureFilter = "bilinear"
    seed: int = 0

    def sampling(self, density: float) -> SurfaceSampling:
        return SurfaceSampling(
            density=density,
            min_count=self.min_count,
            max_count=self.max_count,
            disc_scale=self.disc_scale,
            thickness=self.thickness,
            opacity=self.opacity,
            texture_filter=self.texture_filter,
        )


@dataclass
class ScenePart:
    """One rigid body's Gaussians in its local frame. ``static``: the body never moves (static/kinematic actor)."""

    name: str
    kind: PartKind
    static: bool
    gaussians: GaussianSet


@dataclass
class SceneGaussians:
    """The parts in render order, and the parameters that built them (free-form, recorded in the manifest)."""

    parts: list[ScenePart]
    conversion: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [(p.kind, p.name) for p in self.parts]
        duplicates = sorted({f"{kind} {name}" for kind, name in names if names.count((kind, name)) > 1})
        if duplicates:
            raise ValueError(f"SceneGaussians has duplicate parts {duplicates}")

    def part(self, name: str) -> ScenePart:
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(f"no part {name!r}; parts are {[p.name for p in self.parts]}")

    @property
    def num_gaussians(self) -> int:
        return sum(len(p.gaussians) for p in self.parts)


# ---------------------------------------------------------------------------------------------------- the scene


@dataclass
class _Body:
    name: str
    kind: PartKind
    static: bool
    handle: Any  # the ManiSkill Link or Actor, for its pose
    entity: sapien.Entity  # the sub-scene-0 SAPIEN entity, for its render shapes


def _bodies(env: Any) -> list[_Body]:
    """Every articulation link, then every actor, of the env's scene, except those hidden from cameras.

    Visuals are read from sub-scene 0 (``_objs[0]``): with several parallel envs they are assumed identical.
    """
    base = env.unwrapped
    hidden = {id(obj) for obj in getattr(base, "_hidden_objects", [])}
    bodies = []
    for articulation in base.scene.articulations.values():
        if id(articulation) in hidden:
            continue
        for link in articulation.get_links():
            bodies.append(_Body(link.name, "link", False, link, link._objs[0].entity))
    for name, actor in base.scene.actors.items():
        if id(actor) in hidden or getattr(actor, "hidden", False):
            continue
        static = actor.px_body_type in ("static", "kinematic")
        bodies.append(_Body(name, "actor", static, actor, actor._objs[0]))
    return bodies


def _shape_scale(shape: sapien.render.RenderShape) -> np.ndarray:
    """Per-axis scale from a shape's stored vertices to metres; SAPIEN keeps unit primitives and scales at draw."""
    if isinstance(shape, sapien.render.RenderShapeBox):
        return np.asarray(shape.half_size, dtype=np.float64)
    if isinstance(shape, sapien.render.RenderShapeSphere):
        return np.full(3, shape.radius, dtype=np.float64)
    if isinstance(shape, sapien.render.RenderShapeCylinder):
        return np.array([shape.half_length, shape.radius, shape.radius], dtype=np.float64)
    if isinstance(shape, sapien.render.RenderShapeCapsule):
        return np.ones(3)  # its vertices are generated at full size
    return np.asarray(getattr(shape, "scale", np.ones(3)), dtype=np.float64)  # triangle mesh, plane


def _material_colors(material: sapien.render.RenderMaterial) -> dict[str, Any]:
    """TriangleMesh colour fields from a SAPIEN material: its base colour factor is linear, so it is sRGB-encoded."""
    colors: dict[str, Any] = {"base_color": tuple(linear_to_srgb(np.asarray(material.base_color[:3])).tolist())}
    texture = material.base_color_texture
    if texture is not None:
        image = texture.download()
        srgb = bool(texture.is_srgb)
        if image.dtype != np.uint8:  # float formats hold linear values
            image, srgb = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), False
        wrap = _WRAP_MODES.get(texture.address_mode, "repeat")
        colors |= {"texture": image, "texture_srgb": srgb, "texture_wrap": wrap}
    return colors


def entity_visual_meshes(entity: sapien.Entity) -> list[TriangleMesh]:
    """The entity's visual meshes in its local frame, in m, one per (render shape, material part).

    Each shape's local pose and size are applied (SAPIEN stores boxes, spheres and cylinders as unit shapes and
    meshes unscaled), and material colours are converted to the display space ``mesh_to_gaussians`` expects.
    """
    render_body = entity.find_component_by_type(sapien.render.RenderBodyComponent)
    if render_body is None:
        return []
    meshes = []
    for shape in render_body.render_shapes:
        local = shape.local_pose.to_transformation_matrix()
        scale = _shape_scale(shape)
        for part in shape.get_parts():
            vertices = part.get_vertices().astype(np.float64) * scale
            faces = part.get_triangles()
            if len(faces) == 0:
                continue
            uv = part.get_vertex_uv()
            colors = _material_colors(part.material)
            if uv.shape != (len(vertices), 2):
                uv = None
                colors.pop("texture", None)
            meshes.append(TriangleMesh(vertices @ local[:3, :3].T + local[:3, 3], faces, uv=uv, **colors))
    return meshes


def _world_xy(mesh: TriangleMesh, pose: np.ndarray) -> np.ndarray:
    """Mesh vertices' world xy [V,2] given the body's world pose [4,4]."""
    return (mesh.vertices @ pose[:3, :3].T + pose[:3, 3])[:, :2]


def _clip_polygon(polygon: list[np.ndarray], corners_xy: np.ndarray, axis: int, bound: float, sign: float) -> list:
    """Sutherland-Hodgman against the half plane sign*(x[axis] - bound) <= 0; vertices are barycentric weights."""
    out = []
    for i, a in enumerate(polygon):
        b = polygon[(i + 1) % len(polygon)]
        da, db = sign * ((a @ corners_xy)[axis] - bound), sign * ((b @ corners_xy)[axis] - bound)
        if da <= 0:
            out.append(a)
        if (da <= 0) != (db <= 0):
            out.append(a + da / (da - db) * (b - a))
    return out


def _crop_xy(mesh: TriangleMesh, world_xy: np.ndarray, box: tuple[float, float, float, float]) -> TriangleMesh:
    """The part of ``mesh`` whose world xy lies in ``box``; cut faces are re-triangulated, attributes interpolated."""
    lo, hi = np.array([box[0], box[2]]), np.array([box[1], box[3]])
    corners = world_xy[mesh.faces]  # [F,3,2]
    inside = np.all((corners >= lo) & (corners <= hi), axis=(1, 2))
    outside = np.any(np.all(corners < lo, axis=1) | np.all(corners > hi, axis=1), axis=1)
    pieces, sources = [], []  # new triangles as barycentric weights [3,3] over their source face's corners
    for face in np.flatnonzero(~inside & ~outside):
        polygon = list(np.eye(3))
        for axis, bound, sign in ((0, lo[0], -1.0), (0, hi[0], 1.0), (1, lo[1], -1.0), (1, hi[1], 1.0)):
            polygon = _clip_polygon(polygon, corners[face], axis, bound, sign) if polygon else polygon
        for k in range(1, len(polygon) - 1):
            pieces.append(np.stack([polygon[0], polygon[k], polygon[k + 1]]))
            sources.append(face)
    weights = np.asarray(pieces).reshape(-1, 3, 3)
    source = np.asarray(sources, dtype=np.int64)

    def extend(per_vertex: np.ndarray | None) -> np.ndarray | None:
        if per_vertex is None:
            return None
        new = np.einsum("tkj,tjd->tkd", weights, np.asarray(per_vertex)[mesh.faces[source]])
        return np.concatenate([per_vertex, new.reshape(-1, per_vertex.shape[1])])

    faces = np.concatenate([mesh.faces[inside], len(mesh.vertices) + np.arange(3 * len(source)).reshape(-1, 3)])
    face_colors = None
    if mesh.face_colors is not None:
        face_colors = np.concatenate([mesh.face_colors[inside], np.asarray(mesh.face_colors)[source]])
    return TriangleMesh(
        extend(mesh.vertices),
        faces,
        vertex_colors=extend(mesh.vertex_colors),
        face_colors=face_colors,
        uv=extend(mesh.uv),
        texture=mesh.texture,
        texture_srgb=mesh.texture_srgb,
        texture_wrap=mesh.texture_wrap,
        base_color=mesh.base_color,
    )


def build_scene_gaussians(env: Any, conversion: SceneConversion | None = None) -> SceneGaussians:
    """Convert every visual of ``env``'s scene (a ManiSkill env, e.g. from ``gym.make``) to per-body Gaussians.

    Parts come in the order of ``_bodies`` (links, then actors); bodies without a visual surface are omitted.
    Large (ground-like) meshes are cropped to the conversion's crop box in the world, using the body's pose now.
    """
    conversion = conversion or SceneConversion()
    bodies = [(body, entity_visual_meshes(body.entity)) for body in _bodies(env)]
    world_xy = [
        [_world_xy(mesh, body.entity.pose.to_transformation_matrix()) for mesh in meshes] for body, meshes in bodies
    ]
    large = [[np.ptp(xy, axis=0).max() > conversion.large_shape_size for xy in body_xy] for body_xy in world_xy]
    crop = conversion.crop_box
    if crop is None and any(map(any, large)):
        small = [xy for b, body_xy in enumerate(world_xy) for m, xy in enumerate(body_xy) if not large[b][m]]
        points = np.concatenate(small) if small else np.zeros((1, 2))
        lo, hi = points.min(axis=0) - conversion.crop_margin, points.max(axis=0) + conversion.crop_margin
        crop = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))

    parts = []
    for b, (body, meshes) in enumerate(bodies):
        sets = []
        for i, mesh in enumerate(meshes):
            density = conversion.static_density if body.static else conversion.body_density
            if large[b][i]:
                mesh, density = _crop_xy(mesh, world_xy[b][i], crop), conversion.large_density
            rng = np.random.default_rng([conversion.seed, zlib.crc32(body.name.encode()), i])
            sets.append(mesh_to_gaussians(mesh, conversion.sampling(density), rng))
        sets = [s for s in sets if len(s)]
        if sets:
            parts.append(ScenePart(body.name, body.kind, body.static, GaussianSet.concat(sets)))
    return SceneGaussians(parts, conversion=asdict(conversion) | {"resolved_crop_box": crop})


def part_entities(env: Any, parts: SceneGaussians | Sequence[ScenePart]) -> list[sapien.Entity]:
    """The SAPIEN entity of each part's body in sub-scene 0, in ``parts`` order (KeyError for a missing body).

    For a single CPU-physics env, ``entity.pose`` is the body's world pose and reading it costs microseconds: a
    renderer that needs every body's pose at every step holds these instead of calling ``part_world_poses``.
    """
    parts = parts.parts if isinstance(parts, SceneGaussians) else parts
    entities = {(body.kind, body.name): body.entity for body in _bodies(env)}
    missing = [f"{p.kind} {p.name!r}" for p in parts if (p.kind, p.name) not in entities]
    if missing:
        raise KeyError(f"scene part(s) {missing} are not bodies of the env's scene")
    return [entities[(p.kind, p.name)] for p in parts]


def part_world_poses(env: Any, parts: SceneGaussians | Sequence[ScenePart]) -> torch.Tensor:
    """World pose of each part's body now, [num_envs, P, 4, 4] float32, in ``parts`` order.

    Read from the simulation (``link.pose`` / ``actor.pose``); a part whose body is not in the scene raises KeyError.
    """
    parts = parts.parts if isinstance(parts, SceneGaussians) else parts
    handles = {(body.kind, body.name): body.handle for body in _bodies(env)}
    num_envs = env.unwrapped.num_envs
    raw_poses = []
    for part in parts:
        handle = handles.get((part.kind, part.name))
        if handle is None:
            raise KeyError(f"scene part {part.kind} {part.name!r} is not a body of the env's scene")
        raw = handle.pose.raw_pose.to(torch.float32)  # [n, 7]: p, q (w, x, y, z); n = 1 for a static actor
        raw_poses.append(raw.expand(num_envs, 7))
    if not raw_poses:
        return torch.zeros(num_envs, 0, 4, 4)
    raw = torch.stack(raw_poses, dim=1)  # [num_envs, P, 7]
    matrices = torch.zeros(num_envs, len(raw_poses), 4, 4, dtype=torch.float32, device=raw.device)
    matrices[..., :3, :3] = quaternion_to_matrix(raw[..., 3:])
    matrices[..., :3, 3] = raw[..., :3]
    matrices[..., 3, 3] = 1.0
    return matrices


# ------------------------------------------------------------------------------------------------------ on disk


class SceneManifestError(ValueError):
    """A scene directory whose ``scene.json`` is missing or malformed; the message names the file and the key."""


def _part_file(index: int, name: str) -> str:
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.ply"


def save_scene(directory: str | os.PathLike, scene: SceneGaussians) -> None:
    """Write one PLY per part and then ``scene.json`` (written last, so its presence marks a complete scene)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, part in enumerate(scene.parts):
        file = _part_file(index, part.name)
        save_ply(directory / file, part.gaussians)
        entries.append({"name": part.name, "kind": part.kind, "static": part.static, "file": file})
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "conversion": scene.conversion}
    manifest["parts"] = entries
    tmp = directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST_NAME)


def load_scene(directory: str | os.PathLike) -> SceneGaussians:
    """Read a directory written by ``save_scene`` (possibly with parts swapped for scans), validating the manifest."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME

    def fail(problem: str) -> SceneManifestError:
        return SceneManifestError(f"{path}: {problem}")

    try:
        manifest = json.loads(path.read_text())
    except OSError as err:
        raise fail(f"cannot read the scene manifest: {err.strerror or err}") from err
    except json.JSONDecodeError as err:
        raise fail(f"not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise fail(f"'format' must be {MANIFEST_FORMAT!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise fail(f"unsupported 'version' {manifest.get('version')!r}; this code reads version {MANIFEST_VERSION}")
    conversion = manifest.get("conversion", {})
    if not isinstance(conversion, dict):
        raise fail("'conversion' must be an object")
    entries = manifest.get("parts")
    if not isinstance(entries, list):
        raise fail("'parts' must be a list")
    parts = []
    root = directory.resolve()
    for index, entry in enumerate(entries):
        where = f"parts[{index}]"
        expected = {"name": str, "kind": str, "static": bool, "file": str}
        if not isinstance(entry, dict):
            raise fail(f"{where} must be an object")
        for key, kind in expected.items():
            if not isinstance(entry.get(key), kind):
                raise fail(f"{where}.{key} must be a {kind.__name__}, got {entry.get(key)!r}")
        if entry["kind"] not in ("link", "actor"):
            raise fail(f"{where}.kind must be 'link' or 'actor', got {entry['kind']!r}")
        file = (directory / entry["file"]).resolve()
        if not file.is_relative_to(root):
            raise fail(f"{where}.file {entry['file']!r} points outside the scene directory")
        if not file.is_file():
            raise fail(f"{where}.file {entry['file']!r} does not exist")
        parts.append(ScenePart(entry["name"], entry["kind"], entry["static"], load_ply(file)))
    try:
        return SceneGaussians(parts, conversion=conversion)
    except ValueError as err:
        raise fail(str(err)) from err


def conversion_from_dict(values: dict[str, Any]) -> SceneConversion:
    """The ``SceneConversion`` recorded in a manifest, to compare with a requested one before reusing a cache.

    Keys that are not parameters (``resolved_crop_box``, the crop actually used) are dropped.
    """
    known = {f.name for f in fields(SceneConversion)}
    values = {k: (tuple(v) if k == "crop_box" and v is not None else v) for k, v in values.items() if k in known}
    return SceneConversion(**values)

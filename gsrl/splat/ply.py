"""Read and write 3D Gaussian splats in the standard 3DGS PLY layout.

The layout is the one the INRIA 3DGS trainer, nerfstudio's ``ns-export gaussian-splat`` and gsplat's examples
write: one ``vertex`` element with float properties ``x y z`` (``nx ny nz`` optional and ignored), ``f_dc_0..2``,
``f_rest_0..M-1``, ``opacity`` (logit), ``scale_0..2`` (log) and ``rot_0..3`` (w, x, y, z, unnormalized).

``f_rest`` is stored *channel-major*: ``f_rest_{c*(K-1)+k}`` is coefficient k+1 of colour channel c (all R
coefficients, then G, then B), so M = 3*(K-1) and the SH degree follows from M (0, 9, 24, 45 -> degree 0..3).
Reading reshapes to [N,3,K-1] and transposes to ``GaussianSet``'s [N,K-1,3]; writing does the inverse.

The parser is our own (header parse + ``np.frombuffer`` on a structured dtype) so a malformed file fails with a
``PlyFormatError`` that names the file and the problem, instead of a shape error deep in the renderer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gsrl.splat.gaussians import GaussianSet

_SCALAR_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}
_FLOAT_TYPES = {"f4", "f8"}
_ENDIAN = {"binary_little_endian": "<", "binary_big_endian": ">", "ascii": "<"}
_F_REST_COUNTS = {0: 0, 9: 1, 24: 2, 45: 3}  # number of f_rest properties -> SH degree
_FIXED_PROPERTIES = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
_FIXED_PROPERTIES += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]


class PlyFormatError(ValueError):
    """A PLY file that is not a readable 3DGS splat; the message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


@dataclass(frozen=True)
class _Header:
    format: str
    num_vertices: int
    properties: list[tuple[str, str]]  # (name, numpy scalar code without byte order)
    data_offset: int


def _parse_header(path: str | os.PathLike, data: bytes) -> _Header:
    """Parse the ASCII header; only a single ``vertex`` element with scalar properties is a 3DGS splat."""
    if not data.startswith(b"ply\n") and not data.startswith(b"ply\r\n"):
        raise PlyFormatError(path, "not a PLY file (it does not start with the 'ply' magic line)")
    match = re.search(rb"end_header\r?\n", data)
    if match is None:
        raise PlyFormatError(path, "PLY header has no 'end_header' line")
    try:
        lines = data[: match.start()].decode("ascii").splitlines()[1:]
    except UnicodeDecodeError as err:
        raise PlyFormatError(path, "PLY header is not ASCII text") from err
    fmt: str | None = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for number, line in enumerate(lines, start=2):
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if len(words) != 3 or words[1] not in _ENDIAN:
                raise PlyFormatError(path, f"header line {number}: unsupported format {line.strip()!r}")
            fmt = words[1]
        elif words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise PlyFormatError(path, f"header line {number}: malformed element line {line.strip()!r}")
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            if not elements:
                raise PlyFormatError(path, f"header line {number}: property before any element")
            if words[1] == "list":
                raise PlyFormatError(
                    path, f"header line {number}: list property {words[-1]!r}; a 3DGS splat has scalar properties only"
                )
            if len(words) != 3 or words[1] not in _SCALAR_TYPES:
                raise PlyFormatError(path, f"header line {number}: malformed property line {line.strip()!r}")
            elements[-1][2].append((words[2], _SCALAR_TYPES[words[1]]))
        else:
            raise PlyFormatError(path, f"header line {number}: unknown keyword {words[0]!r}")
    if fmt is None:
        raise PlyFormatError(path, "PLY header has no 'format' line")
    names = [name for name, _, _ in elements]
    if names != ["vertex"]:
        raise PlyFormatError(path, f"expected exactly one element 'vertex' (the Gaussians), found elements {names}")
    _, count, properties = elements[0]
    seen = [name for name, _ in properties]
    duplicates = sorted({name for name in seen if seen.count(name) > 1})
    if duplicates:
        raise PlyFormatError(path, f"duplicate vertex properties {duplicates}")
    return _Header(fmt, count, properties, match.end())


def _f_rest_names(path: str | os.PathLike, properties: list[tuple[str, str]]) -> list[str]:
    """The f_rest property names in index order, checked to be 0..M-1 with M = 3*(K-1) for a degree 0..3."""
    indices = sorted(int(name[len("f_rest_") :]) for name, _ in properties if re.fullmatch(r"f_rest_\d+", name))
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise PlyFormatError(path, f"f_rest properties are not numbered 0..{len(indices) - 1}: missing {missing}")
    if len(indices) not in _F_REST_COUNTS:
        raise PlyFormatError(
            path,
            f"{len(indices)} f_rest properties do not match an SH degree "
            f"(expected 0, 9, 24 or 45 for degree 0, 1, 2 or 3)",
        )
    return [f"f_rest_{i}" for i in indices]


def _read_records(path: str | os.PathLike, data: bytes, header: _Header) -> np.ndarray:
    """The vertex element as a structured array, one field per property."""
    order = _ENDIAN[header.format]
    dtype = np.dtype([(name, order + code) for name, code in header.properties])
    body = data[header.data_offset :]
    n = header.num_vertices
    if header.format == "ascii":
        tokens = body.split()
        expected = n * len(header.properties)
        if len(tokens) != expected:
            problem = "truncated" if len(tokens) < expected else "has trailing data"
            raise PlyFormatError(
                path, f"ascii vertex data {problem}: {len(tokens)} values for {n} vertices x {len(header.properties)}"
            )
        try:
            values = np.array(tokens, dtype=np.float64).reshape(n, len(header.properties))
        except ValueError as err:
            raise PlyFormatError(path, f"ascii vertex data holds a value that is not a number: {err}") from err
        records = np.empty(n, dtype=dtype)
        for column, (name, _) in enumerate(header.properties):
            records[name] = values[:, column]
        return records
    expected = n * dtype.itemsize
    if len(body) < expected:
        raise PlyFormatError(
            path, f"binary vertex data truncated: {len(body)} bytes for {n} vertices of {dtype.itemsize} bytes each"
        )
    if len(body) > expected:
        raise PlyFormatError(path, f"{len(body) - expected} bytes of trailing data after {n} vertices")
    return np.frombuffer(body, dtype=dtype, count=n)


def _column(path: str | os.PathLike, records: np.ndarray, names: list[str]) -> np.ndarray:
    """Stack ``names`` into float32 [N, len(names)], rejecting NaN/inf so bad files fail here, not in the rasterizer."""
    out = np.empty((len(records), len(names)), dtype=np.float32)
    for i, name in enumerate(names):
        out[:, i] = records[name]
        bad = ~np.isfinite(out[:, i])
        if bad.any():
            raise PlyFormatError(path, f"property {name!r} has {int(bad.sum())} NaN or infinite values")
    return out


def load_ply(path: str | os.PathLike) -> GaussianSet:
    """Read a 3DGS PLY (binary little/big endian or ascii) into a float32 ``GaussianSet`` on the CPU."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise PlyFormatError(path, f"cannot read file: {err.strerror or err}") from err
    header = _parse_header(path, data)
    types = dict(header.properties)
    f_rest = _f_rest_names(path, header.properties)
    required = _FIXED_PROPERTIES + f_rest
    missing = [name for name in required if name not in types]
    if missing:
        raise PlyFormatError(path, f"missing vertex properties {missing}")
    not_float = [f"{name} ({types[name]})" for name in required if types[name] not in _FLOAT_TYPES]
    if not_float:
        raise PlyFormatError(path, f"properties must be float or double, found {not_float}")
    records = _read_records(path, data, header)

    n = header.num_vertices
    rest = _column(path, records, f_rest).reshape(n, 3, len(f_rest) // 3).transpose(0, 2, 1)
    sh = np.concatenate([_column(path, records, ["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :], rest], axis=1)
    return GaussianSet(
        means=torch.from_numpy(_column(path, records, ["x", "y", "z"])),
        quats=torch.from_numpy(_column(path, records, [f"rot_{i}" for i in range(4)])),
        log_scales=torch.from_numpy(_column(path, records, [f"scale_{i}" for i in range(3)])),
        opacity_logits=torch.from_numpy(_column(path, records, ["opacity"])[:, 0].copy()),
        sh=torch.from_numpy(np.ascontiguousarray(sh)),
    )


def save_ply(path: str | os.PathLike, gaussians: GaussianSet) -> None:
    """Write ``gaussians`` as binary little-endian float32 in the INRIA layout (with zero normals, as it writes).

    The file is written to a temporary name and renamed, so a reader (or a cache check) never sees half a file.
    """
    n = len(gaussians)
    rest_count = 3 * (gaussians.sh.shape[1] - 1)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(rest_count)] + ["opacity"]
    names += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]

    def as_numpy(tensor: torch.Tensor, width: int) -> np.ndarray:
        return tensor.detach().to("cpu", torch.float32).reshape(n, width).numpy()

    sh = gaussians.sh.detach().to("cpu", torch.float32)
    rest = sh[:, 1:].transpose(1, 2)  # [N,K-1,3] -> [N,3,K-1], flattened below to channel-major [N,3*(K-1)]
    table = np.concatenate(
        [
            as_numpy(gaussians.means, 3),
            np.zeros((n, 3), dtype=np.float32),
            as_numpy(sh[:, 0], 3),
            as_numpy(rest, rest_count),
            as_numpy(gaussians.opacity_logits, 1),
            as_numpy(gaussians.log_scales, 3),
            as_numpy(gaussians.quats, 4),
        ],
        axis=1,
    )
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in names] + ["end_header"]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(np.ascontiguousarray(table, dtype="<f4").tobytes())
    os.replace(tmp, path)

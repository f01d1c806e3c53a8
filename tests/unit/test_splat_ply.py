"""3DGS PLY I/O: exact round trips, the INRIA channel-major f_rest layout, ascii, and clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gsrl.splat.gaussians import GaussianSet, num_sh_bases
from gsrl.splat.ply import PlyFormatError, load_ply, save_ply


def random_gaussians(n: int, degree: int, seed: int = 0) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    return GaussianSet(
        means=torch.randn(n, 3, generator=g),
        quats=torch.randn(n, 4, generator=g),
        log_scales=torch.randn(n, 3, generator=g) - 4,
        opacity_logits=torch.randn(n, generator=g),
        sh=torch.randn(n, num_sh_bases(degree), 3, generator=g),
    )


def inria_names(degree: int, normals: bool = True) -> list[str]:
    rest = 3 * (num_sh_bases(degree) - 1)
    names = ["x", "y", "z"] + (["nx", "ny", "nz"] if normals else []) + ["f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(rest)] + ["opacity"]
    return names + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]


def write_ply(
    path: Path, names: list[str], rows: np.ndarray, fmt: str = "binary_little_endian", types: dict | None = None
) -> Path:
    """Write a PLY by hand (independently of save_ply), all properties float unless ``types`` says otherwise."""
    types = types or {}
    header = ["ply", f"format {fmt} 1.0", "comment written by the test", f"element vertex {len(rows)}"]
    header += [f"property {types.get(name, 'float')} {name}" for name in names] + ["end_header"]
    text = ("\n".join(header) + "\n").encode("ascii")
    if fmt == "ascii":
        body = "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in rows).encode("ascii")
    else:
        dtype = np.dtype(
            [(name, "<" + {"float": "f4", "double": "f8", "uchar": "u1"}[types.get(name, "float")]) for name in names]
        )
        records = np.empty(len(rows), dtype=dtype)
        for i, name in enumerate(names):
            records[name] = rows[:, i]
        body = records.tobytes()
    path.write_bytes(text + body)
    return path


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_round_trip_is_exact(tmp_path: Path, degree: int) -> None:
    gaussians = random_gaussians(57, degree)
    save_ply(tmp_path / "g.ply", gaussians)
    loaded = load_ply(tmp_path / "g.ply")
    assert loaded.sh_degree == degree
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        assert getattr(loaded, name).dtype == torch.float32
        assert torch.equal(getattr(loaded, name), getattr(gaussians, name)), name


def test_round_trip_of_an_empty_set(tmp_path: Path) -> None:
    save_ply(tmp_path / "empty.ply", random_gaussians(0, 1))
    loaded = load_ply(tmp_path / "empty.ply")
    assert len(loaded) == 0 and loaded.sh_degree == 1


def test_saved_file_has_the_inria_layout(tmp_path: Path) -> None:
    """Other tools read our files: the header lists the INRIA properties in order, and f_rest is channel-major."""
    gaussians = random_gaussians(3, 1)
    save_ply(tmp_path / "g.ply", gaussians)
    data = (tmp_path / "g.ply").read_bytes()
    head, body = data.split(b"end_header\n")
    props = [line.split()[2] for line in head.decode().splitlines() if line.startswith("property")]
    assert props == inria_names(1)
    assert all(line.startswith("property float ") for line in head.decode().splitlines() if "property" in line)
    rows = np.frombuffer(body, dtype="<f4").reshape(3, len(props))
    rest = rows[:, props.index("f_rest_0") : props.index("f_rest_0") + 9]
    # f_rest_{c*3+k} is coefficient k+1 of channel c.
    assert np.array_equal(rest[:, 3 * 1 + 2], gaussians.sh[:, 3, 1].numpy())
    assert np.array_equal(rest[:, 3 * 2 + 0], gaussians.sh[:, 1, 2].numpy())


def known_inria_rows() -> tuple[list[str], np.ndarray]:
    """Two Gaussians of degree 1 with f_rest_i = 100*(gaussian+1) + i, so each coefficient is identifiable."""
    names = inria_names(1)
    rows = np.zeros((2, len(names)), dtype=np.float32)
    for g in range(2):
        values = {"x": 1 + g, "y": 2 + g, "z": 3 + g, "nx": 9, "ny": 9, "nz": 9, "opacity": -0.5 + g}
        values |= {"f_dc_0": 0.1 + g, "f_dc_1": 0.2 + g, "f_dc_2": 0.3 + g}
        values |= {f"scale_{i}": -5.0 - i - g for i in range(3)} | {f"rot_{i}": 0.5 * (i + 1) + g for i in range(4)}
        values |= {f"f_rest_{i}": 100 * (g + 1) + i for i in range(9)}
        rows[g] = [values[name] for name in names]
    return names, rows


def check_known_values(gaussians: GaussianSet) -> None:
    assert gaussians.sh_degree == 1 and len(gaussians) == 2
    assert torch.equal(gaussians.means[1], torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(gaussians.quats[0], torch.tensor([0.5, 1.0, 1.5, 2.0]))
    assert torch.equal(gaussians.log_scales[1], torch.tensor([-6.0, -7.0, -8.0]))
    assert torch.allclose(gaussians.opacity_logits, torch.tensor([-0.5, 0.5]))
    assert torch.allclose(gaussians.sh[0, 0], torch.tensor([0.1, 0.2, 0.3]))
    # Channel-major: R holds f_rest_0..2, G f_rest_3..5, B f_rest_6..8; sh[:, 1 + k, c] = f_rest_{3c + k}.
    expected = torch.tensor([[100.0, 103.0, 106.0], [101.0, 104.0, 107.0], [102.0, 105.0, 108.0]])
    assert torch.equal(gaussians.sh[0, 1:], expected)
    assert torch.equal(gaussians.sh[1, 1:], expected + 100)


def test_reads_hand_written_inria_file(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    check_known_values(load_ply(write_ply(tmp_path / "inria.ply", names, rows)))


def test_reads_ascii_variant(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    check_known_values(load_ply(write_ply(tmp_path / "ascii.ply", names, rows, fmt="ascii")))


@pytest.mark.parametrize("degree", [0, 3])
def test_reads_gsplat_export(tmp_path: Path, degree: int) -> None:
    """A file written by gsplat's own exporter (no normals) loads to the same Gaussians."""
    from gsplat.exporter import export_splats

    gaussians = random_gaussians(20, degree)
    sh = gaussians.sh
    export_splats(
        gaussians.means,
        gaussians.log_scales,
        gaussians.quats,
        gaussians.opacity_logits,
        sh[:, :1],
        sh[:, 1:],
        format="ply",
        save_to=str(tmp_path / "gsplat.ply"),
    )
    loaded = load_ply(tmp_path / "gsplat.ply")
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        assert torch.equal(getattr(loaded, name), getattr(gaussians, name)), name


def test_reads_without_normals_in_any_property_order_with_extra_properties(tmp_path: Path) -> None:
    """gsplat's exporter omits normals; viewers add uchar colours; order of properties must not matter."""
    names, rows = known_inria_rows()
    keep = [i for i, name in enumerate(names) if name not in ("nx", "ny", "nz")][::-1]
    names = [names[i] for i in keep] + ["red"]
    rows = np.concatenate([rows[:, keep], np.full((2, 1), 200.0, dtype=np.float32)], axis=1)
    path = write_ply(tmp_path / "gsplat.ply", names, rows, types={"red": "uchar", "opacity": "double"})
    check_known_values(load_ply(path))


def test_not_a_ply(tmp_path: Path) -> None:
    path = tmp_path / "bad.ply"
    path.write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(PlyFormatError, match="not a PLY file") as info:
        load_ply(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlyFormatError, match="cannot read file"):
        load_ply(tmp_path / "absent.ply")


def test_missing_end_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.ply"
    path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\n")
    with pytest.raises(PlyFormatError, match="end_header"):
        load_ply(path)


def test_missing_property(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    keep = [i for i, name in enumerate(names) if name != "rot_3"]
    path = write_ply(tmp_path / "bad.ply", [names[i] for i in keep], rows[:, keep])
    with pytest.raises(PlyFormatError, match=r"missing vertex properties \['rot_3'\]"):
        load_ply(path)


def test_f_rest_count_not_a_degree(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    names = names + ["f_rest_9", "f_rest_10", "f_rest_11"]
    rows = np.concatenate([rows, np.zeros((2, 3), dtype=np.float32)], axis=1)
    with pytest.raises(PlyFormatError, match="12 f_rest properties do not match an SH degree"):
        load_ply(write_ply(tmp_path / "bad.ply", names, rows))


def test_f_rest_gap(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    names = [name if name != "f_rest_4" else "f_rest_40" for name in names]
    with pytest.raises(PlyFormatError, match=r"missing \[4"):
        load_ply(write_ply(tmp_path / "bad.ply", names, rows))


def test_truncated_binary(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    path = write_ply(tmp_path / "bad.ply", names, rows)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(PlyFormatError, match="truncated"):
        load_ply(path)


def test_truncated_ascii(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    path = write_ply(tmp_path / "bad.ply", names, rows, fmt="ascii")
    path.write_bytes(path.read_bytes().rsplit(b" ", 1)[0])
    with pytest.raises(PlyFormatError, match="truncated"):
        load_ply(path)


def test_trailing_data(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    path = write_ply(tmp_path / "bad.ply", names, rows)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(PlyFormatError, match="trailing data"):
        load_ply(path)


def test_wrong_element(tmp_path: Path) -> None:
    path = tmp_path / "mesh.ply"
    path.write_bytes(
        b"ply\nformat ascii 1.0\nelement point 1\nproperty float x\nelement face 0\n"
        b"property list uchar int vertex_indices\nend_header\n0\n"
    )
    with pytest.raises(PlyFormatError, match="list property"):
        load_ply(path)
    path.write_bytes(b"ply\nformat ascii 1.0\nelement point 1\nproperty float x\nend_header\n0\n")
    with pytest.raises(PlyFormatError, match=r"exactly one element 'vertex'.*\['point'\]"):
        load_ply(path)


def test_non_float_property(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    with pytest.raises(PlyFormatError, match=r"float or double.*opacity \(u1\)"):
        load_ply(write_ply(tmp_path / "bad.ply", names, rows, types={"opacity": "uchar"}))


def test_nan_value(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    rows[1, names.index("scale_2")] = np.nan
    with pytest.raises(PlyFormatError, match=r"'scale_2' has 1 NaN"):
        load_ply(write_ply(tmp_path / "bad.ply", names, rows))


def test_unsupported_format_and_non_number(tmp_path: Path) -> None:
    names, rows = known_inria_rows()
    path = write_ply(tmp_path / "bad.ply", names, rows, fmt="ascii")
    path.write_bytes(path.read_bytes().replace(b"ascii 1.0", b"binary_middle_endian 1.0"))
    with pytest.raises(PlyFormatError, match="unsupported format"):
        load_ply(path)
    path = write_ply(tmp_path / "bad2.ply", names, rows, fmt="ascii")
    path.write_bytes(path.read_bytes().replace(b"101.0", b"abc"))
    with pytest.raises(PlyFormatError, match="not a number"):
        load_ply(path)

"""Generate the gRPC/protobuf Python modules from ``proto/`` into ``gsrl/v1``.

Generated code is never committed: the build (``make proto``, ``scripts/bootstrap.sh``) makes it,
so the ``.proto`` files stay the one source of truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate() -> list[Path]:
    """Run ``grpc_tools.protoc`` on every ``proto/gsrl/v1/*.proto``; returns the generated files."""
    from grpc_tools import protoc

    sources = sorted(PROTO_DIR.glob("gsrl/v1/*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {PROTO_DIR / 'gsrl/v1'}")
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *[str(s.relative_to(PROTO_DIR)) for s in sources],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    return sorted((ROOT / "gsrl" / "v1").glob("*_pb2*.py"))


if __name__ == "__main__":
    files = generate()
    print(f"generated {len(files)} files in gsrl/v1", file=sys.stderr)

"""Fetch SAPIEN's PhysX GPU library into ~/.sapien/physx/<version>/ at image build time.

sapien 3.0.3's ``sapien.physx.enable_gpu()`` downloads ``libPhysXGpu_64.so`` on first use and then loads it with
``libcuda.so``. A build has no GPU driver, so the download succeeds and the load fails; what matters is that the
library is in the image afterwards, so pods never download it at start (nor need internet access to do so).
"""

from __future__ import annotations

import sys
from pathlib import Path

import sapien.physx as physx


def main() -> int:
    target = Path.home() / ".sapien" / "physx" / physx.version() / "libPhysXGpu_64.so"
    try:
        physx.enable_gpu()
    except Exception as exc:  # expected without a driver: OSError (no libcuda.so) or RuntimeError
        print(f"enable_gpu() after the download: {type(exc).__name__}: {exc} (expected at build time)")
    if not target.is_file():
        print(f"PhysX GPU library missing at {target}", file=sys.stderr)
        return 1
    print(f"PhysX GPU library: {target} ({target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

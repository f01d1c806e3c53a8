"""Keep large buffers in the heap: glibc's malloc otherwise maps and unmaps every block of 32 MiB or more.

Each fresh mapping is paid for in 4 KiB page faults on first touch, so copying a 64 MiB tensor into ``bytes`` (what
``tobytes``, protobuf's ``data`` and ``SerializeToString`` do) took 25-55 ms here instead of 3-6 ms: the tensor codec
ran at 0.6 GB/s against numpy's 10 GB/s (numpy asks for huge pages on its own buffers), and weights, image segments
and observation batches all go through it. Raising ``M_MMAP_THRESHOLD`` above the sizes gsrl moves lets freed blocks be
reused; ``M_TRIM_THRESHOLD`` bounds how much freed memory a process keeps before returning it to the kernel.

Applied once when ``gsrl`` is imported; ``GSRL_MALLOC_TUNING=0`` leaves malloc alone. Only glibc has ``mallopt``;
elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 512 << 20  # glibc's own ceiling for its dynamic threshold is 32 MiB on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30
OPT_OUT = "GSRL_MALLOC_TUNING"


def keep_large_buffers_in_heap(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Sets both thresholds through ``mallopt``; True when glibc accepted them."""
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )

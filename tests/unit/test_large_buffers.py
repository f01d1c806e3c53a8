"""gsrl.large_buffers: importing gsrl tunes glibc's malloc once, and GSRL_MALLOC_TUNING=0 opts out."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from gsrl.large_buffers import keep_large_buffers_in_heap

GLIBC = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; this platform has none")
def test_glibc_accepts_the_thresholds() -> None:
    assert keep_large_buffers_in_heap({}) is True


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_opt_out_leaves_malloc_alone(value: str) -> None:
    assert keep_large_buffers_in_heap({"GSRL_MALLOC_TUNING": value}) is False


PROBE = """
import resource, gsrl
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = b"x" * (64 << 20)  # written, so every page is touched
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(**env: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; this platform has none")
def test_import_lets_large_blocks_be_reused() -> None:
    """Ten 64 MiB blocks: with the tuning the first block's pages are reused, without it each one faults anew."""
    tuned, untuned = _page_faults(GSRL_MALLOC_TUNING="1"), _page_faults(GSRL_MALLOC_TUNING="0")
    assert untuned > 10 * 8000, f"expected about 16k faults per fresh 64 MiB mapping, got {untuned} for ten"
    assert tuned < untuned / 4, (tuned, untuned)

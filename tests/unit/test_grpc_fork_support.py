"""Importing gsrl turns gRPC's fork support off before grpc initialises (see gsrl/__init__.py, grpc/grpc#43055)."""

from __future__ import annotations

import os
import subprocess
import sys


def _fork_support_after(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_gsrl_disables_grpc_fork_support_unless_the_user_set_it() -> None:
    read = "import os, gsrl, grpc; print(os.environ.get('GRPC_ENABLE_FORK_SUPPORT'))"
    assert _fork_support_after(read) == "false"
    assert _fork_support_after(read, GRPC_ENABLE_FORK_SUPPORT="true") == "true"  # an explicit choice is kept


def test_roles_import_gsrl_before_grpc() -> None:
    """The role entry points load gsrl (which sets the variable) before anything that loads grpc."""
    code = (
        "import sys\n"
        "import services.policy_server.__main__, services.env_server.__main__\n"
        "mods = list(sys.modules)\n"
        "print(mods.index('gsrl') < mods.index('grpc'))"
    )
    assert _fork_support_after(code) == "True"

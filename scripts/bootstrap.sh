#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for gsrl: system packages (redis-server, Mesa's Vulkan driver
# >= 24.3 from bookworm-backports for SAPIEN's CPU rendering), a virtualenv with the CPU torch
# build, the project in editable mode, and the generated gRPC code. Idempotent: a stamp file
# keyed on pyproject.toml skips the Python part when nothing changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

log() { printf '[bootstrap] %s\n' "$*"; }

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
mesa_version() { dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | sed -E 's/^[0-9]+://; s/[-+~].*//'; }
mesa_ok() {
  local v; v=$(mesa_version)
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "24.3" "$v" | sort -V | head -1)" = "24.3" ]
}
if command -v apt-get >/dev/null 2>&1; then
  if ! mesa_ok; then
    if grep -q bookworm /etc/os-release 2>/dev/null && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding the bookworm-backports apt source (Mesa >= 24.3 for SAPIEN's lavapipe rendering)"
      echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/gsrl-backports.list >/dev/null
    fi
    need_mesa=1
  fi
  if [ ${#need_apt[@]} -gt 0 ] || [ -n "${need_mesa:-}" ]; then
    log "installing system packages: ${need_apt[*]:-} ${need_mesa:+mesa-vulkan-drivers (backports)}"
    $SUDO apt-get update -qq
    [ ${#need_apt[@]} -gt 0 ] && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    if [ -n "${need_mesa:-}" ]; then
      if grep -q bookworm /etc/os-release 2>/dev/null; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
      else
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
      fi
    fi
  fi
else
  log "apt-get not found: install redis-server and a Vulkan driver (Mesa >= 24.3) yourself"
fi

stamp="$VENV/.gsrl-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  log "installing Python packages into $VENV (CPU torch 2.13.0 first so nothing pulls a CUDA build)"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}"
  fi
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
log "generating gRPC code from proto/"
"$VENV/bin/python" -m gsrl.protogen
log "ready: $VENV"

#!/usr/bin/env bash
# Runs the proxmoxer interoperability test against the pve-sim binary.
# Installs the pinned packages into a virtualenv under target/ (reused between runs).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
venv="$target/pyenv-proxmoxer"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --quiet -p pve-sim --bin pve-sim
PVE_SIM_BIN="$target/debug/pve-sim" "$venv/bin/python" -m pytest -q tests/python "$@"

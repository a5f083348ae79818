#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 (jax 0.11.2 needs it) and installs dsv4_jax into it.
#   scripts/setup.sh          runtime install (generate, convert, info)
#   scripts/setup.sh test     plus the test extra (pytest, torch CPU cross-check, transformers, notebook tools)
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for c in python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return
    fi
  done
  # pyenv keeps versions that are installed but not selected.
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if [ -x "$p" ]; then echo "$p"; return; fi
  done
  echo "no Python >= 3.12 found (jax 0.11.2 needs it)" >&2; exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"

#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 (jax 0.11.2 needs it) and installs dsv4_jax into it.
#   scripts/setup.sh          runtime install (generate, convert, info)
#   scripts/setup.sh test     plus the test extra (pytest, transformers, notebook tools) and torch for the HF
#                             cross-check, without the parts of torch that only a GPU run loads (see below)
set -euo pipefail
cd "$(dirname "$0")/.."

# The torch the HF cross-check (tests/test_transformers_crosscheck.py) was measured with.
TORCH_VERSION=2.13.0

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
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "${1:-}" != "test" ]; then
  "${pip[@]}" -e .
  exit 0
fi
"${pip[@]}" -e ".[test]"

# torch, for the HF cross-check on CPU. PyPI's Linux x86_64 torch is the CUDA build: libtorch links the CUDA
# libraries (cuBLAS, cuDNN, NCCL, cuFFT, ...), so `import torch` fails without their nvidia-* wheels, even on a
# machine without a GPU (checked: a --no-deps torch stops at "libcudnn.so.9: cannot open shared object file").
# What a CPU run never loads is left out: triton (torch.compile's GPU code generator), cuda-bindings, and the CUDA
# components that libtorch opens only on demand (cuSOLVER for GPU linear algebra, CUPTI for the profiler, NVTX).
# Everything else is installed at the versions torch's own metadata pins. This saves about 1 GB of the venv; the
# rest (torch itself and the linked CUDA libraries) is the price of the CUDA build, the only one PyPI has.
"${pip[@]}" --no-deps "torch==${TORCH_VERSION}"
mapfile -t torch_deps < <(.venv/bin/python - <<'PY'
import re
from importlib.metadata import requires

from packaging.requirements import Requirement  # installed with pytest

GPU_ONLY = re.compile(r"triton|cuda-bindings|cusolver|cupti|nvtx")
for r in map(Requirement, requires("torch")):
    if (r.marker is None or r.marker.evaluate({"extra": ""})) and not GPU_ONLY.search(r.name):
        extras = sorted(e for e in r.extras if not GPU_ONLY.search(e))
        print(f"{r.name}{'[' + ','.join(extras) + ']' if extras else ''}{r.specifier}")
PY
)
# --no-warn-conflicts: pip would otherwise list the GPU-only packages above as missing requirements of torch.
"${pip[@]}" --no-warn-conflicts "${torch_deps[@]}"
.venv/bin/python -c 'import torch' || { echo "setup.sh: torch ${TORCH_VERSION} does not import (see above)" >&2; exit 1; }

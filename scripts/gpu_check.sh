#!/usr/bin/env bash
# One GPU session: build the FFI extension, run the GPU tests, then the kernel benchmarks; logs under $1.
#   scripts/gpu_check.sh OUT [build|prebuilt] [tests|notests] [bench|quick|decode|prefill|nobench] [PYTEST_K]
# Offline machines: put the flax wheel under .whl/ and the sgl-deep-gemm wheel under .dg/ (BUILD.md); "prebuilt"
# takes .so/_ffi*.so instead of building. Each phase has its own time limit so that logs always come back.
# Always `python -m pip`: the image's bare `pip` belongs to another interpreter than `python`.
set -u
OUT=${1:?output directory}
MODE=${2:-build}
TESTS=${3:-tests}
BENCH=${4:-bench}
KSEL=${5:-}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

if ls .whl/*.whl >/dev/null 2>&1; then python -m pip install -q --no-deps --no-index .whl/*.whl >"$OUT/setup.log" 2>&1; fi
python -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/setup.log" 2>&1 || { echo "project install failed"; tail "$OUT/setup.log"; }

# Scratch space for the unpacked sources, the wheel and the extension package: a fresh folder per run.
SCRATCH=${DSV4_GPU_SCRATCH:-$(mktemp -d)}
export SCRATCH
PKG=$SCRATCH/ffipkg/dsv4_jax_ffi
mkdir -p "$PKG"
cp ffi/src/dsv4_jax_ffi/__init__.py "$PKG/"
if [ "$MODE" = build ]; then
  python - <<'EOF'
import glob, os, zipfile
zipfile.ZipFile(glob.glob(".dg/sgl_deep_gemm-*.whl")[0]).extractall(os.path.join(os.environ["SCRATCH"], "dg"))
EOF
  ( DSV4_DEEPGEMM_INCLUDE=$SCRATCH/dg/deep_gemm/include CMAKE_BUILD_PARALLEL_LEVEL=16 \
      python -m pip wheel --no-build-isolation --no-deps -w "$SCRATCH/ffiwheel" ./ffi ) >"$OUT/build.log" 2>&1 \
    || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
  python - <<'EOF'
import glob, os, zipfile
scratch = os.environ["SCRATCH"]
z = zipfile.ZipFile(glob.glob(os.path.join(scratch, "ffiwheel", "dsv4_jax_ffi-*.whl"))[0])
for n in z.namelist():
    if n.startswith("dsv4_jax_ffi/_ffi"):
        open(os.path.join(scratch, "ffipkg", "dsv4_jax_ffi", n.split("/")[-1]), "wb").write(z.read(n))
EOF
  mkdir -p "$OUT/so" && cp "$PKG"/_ffi*.so "$OUT/so/"
  echo "built in $(elapsed) s"
else
  cp .so/_ffi*.so "$PKG/"
fi
export PYTHONPATH=$SCRATCH/ffipkg:${PYTHONPATH:-}
python -c "import dsv4_jax_ffi as m; print('ffi', m.cuda_archs, m.deepgemm_source, len(m.instantiations()), 'GEMMs')"

if [ "$TESTS" = tests ]; then
  # One pytest invocation, 4 xdist workers sharing the GPU (no preallocation): the tests are compile-bound.
  KARG=(); [ -n "$KSEL" ] && KARG=(-k "$KSEL")
  export DSV4_GPU_REPORT="$OUT/e2e_report.txt"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_LIMIT:-400}" python -m pytest -m gpu tests/test_kernels_gpu.py \
    -n "${TEST_WORKERS:-4}" --dist load --max-worker-restart=8 -v -rs --durations=8 "${KARG[@]}" >"$OUT/gpu_tests.log" 2>&1
  echo "tests rc=$? at $(elapsed) s"; grep -E "FAILED|ERROR| passed| failed" "$OUT/gpu_tests.log" | tail -25; cat "$OUT/e2e_report.txt" 2>/dev/null
fi

if [ "$BENCH" != nobench ]; then
  LEFT=$(( 575 - $(elapsed) ))
  FLAG=""; [ "$BENCH" = quick ] && FLAG="--quick"; [ "$BENCH" = decode ] && FLAG="--decode"; [ "$BENCH" = prefill ] && FLAG="--prefill"
  timeout "$LEFT" python benchmarks/bench_kernels.py $FLAG --out "$OUT/bench.json" --markdown "$OUT/bench.md" \
    >"$OUT/bench.log" 2>&1
  echo "bench rc=$? at $(elapsed) s"; tail -45 "$OUT/bench.log"
fi

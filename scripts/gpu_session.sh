#!/usr/bin/env bash
# One device call: set up the project with a prebuilt extension, then run the named phases, each under its own time
# limit, logs under OUT (the device tool brings OUT back).
#   scripts/gpu_session.sh OUT "PHASE[=ARGS][@SECONDS]" ...
# The device tool brings back at most 8 files from OUT: keep the phases' outputs under that.
# Phases: tests-gpu[=WORKERS] (the whole GPU suite), tests=PYTEST_ARGS (pytest -m gpu -n 4 PYTEST_ARGS), tests-fp4, tests-kernels[=PYTEST_K], bench-fp4, bench-e2e[=ARGS],
# bench-kernels=ARGS (benchmarks/bench_kernels.py ARGS), py=SCRIPT ARGS (python SCRIPT ARGS), bench-compile[=ARGS], full-size[=ARGS], xla=FLAGS (XLA_FLAGS for the phases after it; "xla=" clears them),
# sh=COMMAND (any shell command, e.g. ncu around a probe), env=NAME=VALUE (exported for the phases after it;
# "env=NAME=" empties it), so=DIR (the phases after it load the
# extension prebuilt under DIR instead of .gpu/so: two builds compared in one call).
# Offline machine: wheels missing from the image under .whl/ (flax), the extension prebuilt here under .gpu/so/
# (BUILD.md: built on a CPU box with nvcc, carried). Always `python -m pip`: the image's bare pip is another Python's.
set -u
OUT=${1:?output directory}
shift
mkdir -p "$OUT"
T0=$(date +%s)
# Scratch space for the carried wheels and the extension package: a fresh folder per run.
SCRATCH=${DSV4_GPU_SCRATCH:-$(mktemp -d)}
elapsed() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0

if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH/site" .whl/*.whl >"$OUT/setup.log" 2>&1
  export PYTHONPATH=$SCRATCH/site:${PYTHONPATH:-}
fi
python -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/setup.log" 2>&1 || { echo "project install failed"; tail "$OUT/setup.log"; }
mkdir -p "$SCRATCH/ffipkg/dsv4_jax_ffi"
cp ffi/src/dsv4_jax_ffi/__init__.py .gpu/so/_ffi*.so "$SCRATCH/ffipkg/dsv4_jax_ffi/"
export PYTHONPATH=$SCRATCH/ffipkg:$PWD:${PYTHONPATH:-}
python -c "import jax, flax, dsv4_jax_ffi as m; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices(), len(m.instantiations()), 'GEMMs')" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

for spec in "$@"; do
  name=${spec%@*}; limit=300
  [[ "$name" == tests-gpu* ]] && limit=560  # the whole suite: 310 s at 419 tests, >430 s at 430 (twelfth session)
  [[ "$spec" == *@* ]] && limit=${spec##*@}
  arg=""; [[ "$name" == *=* ]] && arg=${name#*=} && name=${name%%=*}
  echo "== $name (limit $limit s) at $(elapsed) s"
  case "$name" in
    xla)
      export XLA_FLAGS="$arg"; echo "XLA_FLAGS=$XLA_FLAGS" ;;
    env)
      export "${arg?}"; echo "$arg" ;;
    so)
      # A fresh package folder per build: the phases run in new processes, so each loads the extension named last.
      pkg=$SCRATCH/ffipkg_$(elapsed); mkdir -p "$pkg/dsv4_jax_ffi"
      cp ffi/src/dsv4_jax_ffi/__init__.py "$arg"/_ffi*.so "$pkg/dsv4_jax_ffi/"
      export PYTHONPATH=$pkg:${PYTHONPATH#"$SCRATCH"/ffipkg*:}; echo "extension from $arg" ;;
    tests-gpu)
      export DSV4_GPU_REPORT="$OUT/e2e_report.txt"
      # The workers share one GPU: with the default BFC allocator each grows its pool by doubling regions, and one
      # asked for 64 GiB while seven others held theirs (OOM in test_end_to_end_generate_mxfp4_flash_layers, 8
      # workers). The platform allocator (this phase only) takes what each buffer needs, no more.
      # ARG: xdist workers (default 8); compiling the full-width end-to-end tests is what takes the time. --dist load:
      # the CPU suite's loadfile (pyproject addopts) would put every test of test_kernels_gpu.py on one worker.
      # --max-worker-restart: a kernel that kills its worker fails its test, the others still run (under --dist load
      # a crashed test is not handed out again; the CPU suite's addopts stop at the first crash).
      XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout "$limit" python -m pytest -m gpu tests -n "${arg:-8}" --dist load \
        --max-worker-restart=8 -q -rs --durations=15 -p no:cacheprovider >"$OUT/tests_gpu.log" 2>&1
      echo "rc=$?"; grep -E "FAILED|ERROR| passed| failed" "$OUT/tests_gpu.log" | tail -25
      sed -n '/slowest/,/^$/p' "$OUT/tests_gpu.log" | head -18; cat "$OUT/e2e_report.txt" 2>/dev/null ;;
    tests)
      # shellcheck disable=SC2086
      # eval: ARGS may quote a -k expression with spaces
      eval "DSV4_GPU_REPORT=$SCRATCH/report.txt XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout $limit python -m pytest \
        -m gpu -n 4 --dist load --max-worker-restart=8 -q -rs --durations=8 -p no:cacheprovider $arg" >"$OUT/tests.log" 2>&1
      echo "rc=$?"; grep -E "FAILED|ERROR| passed| failed" "$OUT/tests.log" | tail -25; cat "$SCRATCH/report.txt" 2>/dev/null ;;
    tests-fp4)
      timeout "$limit" python -m pytest -m gpu tests/test_fp4_kernels_gpu.py tests/test_fp4_moe_gpu.py tests/test_fp4_prefill_gpu.py -n 4 --dist load --max-worker-restart=8 -q -rs --durations=5 >"$OUT/tests_fp4.log" 2>&1
      echo "rc=$?"; grep -E "FAILED|ERROR| passed| failed" "$OUT/tests_fp4.log" | tail -15 ;;
    tests-kernels)
      export DSV4_GPU_REPORT="$OUT/e2e_report.txt"
      KARG=(); [ -n "$arg" ] && KARG=(-k "$arg")
      timeout "$limit" python -m pytest -m gpu tests/test_kernels_gpu.py -n 3 --dist load --max-worker-restart=8 -q -rs --durations=8 "${KARG[@]}" \
        >"$OUT/tests_kernels.log" 2>&1
      echo "rc=$?"; grep -E "FAILED|ERROR| passed| failed" "$OUT/tests_kernels.log" | tail -15; cat "$OUT/e2e_report.txt" 2>/dev/null ;;
    bench-fp4)
      timeout "$limit" python benchmarks/bench_kernels.py --fp4-decode --out "$OUT/bench_fp4.json" \
        --markdown "$OUT/bench_fp4.md" >"$OUT/bench_fp4.log" 2>&1
      echo "rc=$?"; tail -25 "$OUT/bench_fp4.log" ;;
    bench-e2e)
      # shellcheck disable=SC2086
      n=$(ls "$OUT"/bench_e2e*.log 2>/dev/null | wc -l); tag="bench_e2e_$n"
      timeout "$limit" python benchmarks/bench_e2e.py $arg --out "$OUT/$tag.json" --markdown "$OUT/$tag.md" \
        >"$OUT/$tag.log" 2>&1
      echo "rc=$?"; tail -8 "$OUT/$tag.log" | cut -c1-600 ;;
    bench-kernels)
      # shellcheck disable=SC2086
      timeout "$limit" python benchmarks/bench_kernels.py $arg >"$OUT/bench_kernels.log" 2>&1
      echo "rc=$?"; tail -20 "$OUT/bench_kernels.log" ;;
    sh)
      # Any shell command with the project's environment (e.g. a profiler around a probe), output in OUT/sh_N.log
      n=$(ls "$OUT"/sh_*.log 2>/dev/null | wc -l)
      eval "timeout $limit $arg" >"$OUT/sh_$n.log" 2>&1
      echo "rc=$?"; tail -40 "$OUT/sh_$n.log" | cut -c1-300 ;;
    py)
      # Any script: py=SCRIPT ARGS (e.g. py=benchmarks/bench_fp4_prefill.py --tokens 2048,8192), or py=-c '...'
      # (eval: ARGS may quote a program with spaces)
      n=$(ls "$OUT"/py_*.log 2>/dev/null | wc -l); tag="py_$n"
      eval "timeout $limit python $arg" >"$OUT/$tag.log" 2>&1
      echo "rc=$?"; tail -25 "$OUT/$tag.log" | cut -c1-400 ;;
    bench-compile)
      # shellcheck disable=SC2086
      timeout "$limit" python benchmarks/bench_compile.py $arg --out "$OUT/bench_compile.json" >"$OUT/bench_compile.log" 2>&1
      echo "rc=$?"; tail -6 "$OUT/bench_compile.log" ;;
    full-size)
      # shellcheck disable=SC2086
      n=$(ls "$OUT"/full_size*.log 2>/dev/null | wc -l); tag="full_size_$n"
      timeout "$limit" python scripts/run_full_size.py $arg >"$OUT/$tag.log" 2>&1
      echo "rc=$?"; grep -v Warning "$OUT/$tag.log" | cut -c1-1500 | tail -12 ;;
    *) echo "unknown phase $name" ;;
  esac
done
echo "done at $(elapsed) s"

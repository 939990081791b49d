#!/usr/bin/env bash
# One-shot GPU check for a bare CUDA machine (written for one H100, Python with a CUDA
# torch preinstalled, nvcc 13, maybe no ninja/cmake, no network). From the repository root:
#
#   bash scripts/gpu_check.sh            # results under ./gpu_out
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Steps, correctness first, so that a short lease still yields the verdict (each under
# `timeout`, clamped to an overall budget; failures do not stop the run):
#   env            GPU / toolkit / torch facts
#   build_ext      the extension in place (setup.py build_ext --inplace; sources compiled in
#                  parallel even without ninja)
#   cmake_build    the torch-free kernel library + C++ benchmarks (CMake, or plain nvcc when
#                  cmake is missing), in the background while build_ext and the tests run
#   pytest_cuda    every test marked `cuda` under tests/ (pytest -m cuda): the CUDA ops and
#                  decode against the CPU, graphs, no host sync, NaN propagation, the int4
#                  key summary (tests/select/test_key_summary.py: summarize_keys bytes,
#                  select_scores_summary, decode with selector "int4")
#   sanitize_memcheck_py  one compute-sanitizer memcheck of scripts/sanitizer_case.py
#                  (skipped if no compute-sanitizer), while
#   pytest_rest    the rest of tests/ (pytest -m "not cuda", which on this machine also runs
#                  any CUDA case that lacks the marker) runs in the background
#   profile_kernels  benchmarks/profile_kernels.py: the CUDA kernels of one default step
#   bench_decode   benchmarks/bench_decode.py: batch 1 and 16 at 32K and 128K (bf16, 32/8
#                  heads, D=128), with select_scores and the other stages timed apart
#   op_timings     python op timings against torch.topk / SDPA
#   bench_*        C++ benchmarks (JSON; bench_cpp_sweep: sparse attention and top-k at
#                  B = 1, 4, 16 x N = 8K, 32K, 128K); bench_key_summary: summary build / append and
#                  select_scores from K against from the summary
#   sanitize_*     what is left of the budget: racecheck on scripts/sanitizer_case.py, and
#                  memcheck / racecheck on the C++ benchmarks with --tiny sizes
# Everything lands in $OUT: one log per step, JSON from the benchmarks, summary.txt with
# PASS/FAIL/TIMEOUT/SKIP per step and the headline numbers.
#
# Knobs: OUT, GPU_CHECK_BUDGET (seconds, default 470), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST
# (9.0), PYTHON (the interpreter with torch), BUILD_DIR (CMake build, default build/gpu-check).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${GPU_CHECK_BUDGET:-470}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
BUILD_DIR="${BUILD_DIR:-$ROOT/build/gpu-check}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vattention-gpu-check.XXXXXX")"

export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export PYTHONUNBUFFERED=1

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY="$(command -v "$candidate")"
      break
    fi
  done
fi
PY="${PY:-python3}"
export PY

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  for c in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [ -x "$c" ]; then NVCC="$c"; break; fi
  done
fi
if [ -n "$NVCC" ]; then export PATH="$(dirname "$NVCC"):$PATH"; fi
export NVCC
# The toolkit root for setup.py: nvcc may be a wrapper script, so ask nvcc itself
# ("#$ TOP=<root>" in its dry run) rather than trusting its location.
if [ -z "${CUDA_HOME:-}" ] && [ -n "$NVCC" ]; then
  CUDA_TOP="$("$NVCC" -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
  if [ -n "$CUDA_TOP" ] && [ -d "$CUDA_TOP/include" ]; then
    CUDA_HOME="$(readlink -f "$CUDA_TOP")"
  else
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
  fi
  export CUDA_HOME
fi

# sm_XX list from TORCH_CUDA_ARCH_LIST ("9.0" -> 90, "8.0;9.0+PTX" -> 80 90).
ARCHS="$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';,' '  ' | sed 's/+PTX//g; s/\.//g')"
ARCHS="${ARCHS:-90}"
export ARCHS

record() {  # STATUS NAME SECONDS NOTE
  printf '%-14s %-44s %5ss  %s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
}

remaining() { echo $((DEADLINE - $(date +%s))); }

# run_step NAME MAX_SECONDS CMD...: runs CMD under timeout (clamped to the budget left),
# output to $OUT/NAME.log, one line in the summary. Returns CMD's status.
run_step() {
  local name=$1 max=$2
  shift 2
  local left=$(( $(remaining) - 8 ))
  if (( left < 15 )); then
    record SKIP "$name" 0 "budget exhausted"
    return 0
  fi
  local limit=$(( max < left ? max : left ))
  local t0
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" > "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status
  if (( rc == 0 )); then
    status=PASS
  elif (( rc == 124 || rc == 137 )); then
    status="TIMEOUT"
  elif (( rc == 77 )); then
    status=SKIP
  else
    status="FAIL(rc=$rc)"
  fi
  record "$status" "$name" "$dt" "$name.log"
  echo "[gpu_check] $status $name (${dt}s)"
  return $rc
}

# ---------------------------------------------------------------------------------------
# step bodies (exported so that `timeout bash -c` can run them)
# ---------------------------------------------------------------------------------------

step_env() {
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  echo "nvcc: ${NVCC:-none}  CUDA_HOME: ${CUDA_HOME:-unset}"; [ -n "$NVCC" ] && "$NVCC" --version
  echo "cmake: $(command -v cmake || echo none)"; echo "ninja: $(command -v ninja || echo none)"
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sms", p.multi_processor_count, "cc", f"{p.major}.{p.minor}",
          "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import ninja  # noqa: F401
    print("python ninja module: yes")
except ImportError:
    print("python ninja module: no")
EOF
}

# setup.py build_ext --inplace; without ninja, torch compiles one source at a time, so the
# sources are compiled in forked processes instead (torch's non-ninja path switches the
# compiler executable per source, so threads would race).
step_build_ext() {
  if command -v ninja >/dev/null 2>&1 || "$PY" -c "import ninja" >/dev/null 2>&1; then
    echo "ninja found: setup.py build_ext --inplace (MAX_JOBS=$MAX_JOBS)"
    "$PY" setup.py build_ext --inplace --force || return 1
  else
    echo "no ninja: setup.py build_ext --inplace with sources compiled in $MAX_JOBS processes"
    cat > "$WORK/parallel_setup.py" <<'EOF'
import multiprocessing
import os
import runpy
import sys

import setuptools  # noqa: F401
from setuptools._distutils import ccompiler
from setuptools._distutils.errors import CompileError

_jobs = max(1, int(os.environ.get("MAX_JOBS", "8")))


def parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                     extra_preargs=None, extra_postargs=None, depends=None):
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def compile_one(obj):
        src, ext = build[obj]
        try:
            self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
        except BaseException as e:  # noqa: BLE001
            print(f"compile failed: {src}: {e}", file=sys.stderr, flush=True)
            os._exit(1)
        os._exit(0)

    ctx = multiprocessing.get_context("fork")
    running, failed = [], []
    for obj in [o for o in objects if o in build]:
        while len(running) >= _jobs:
            p = running.pop(0)
            p.join()
            if p.exitcode != 0:
                failed.append(p.name)
        p = ctx.Process(target=compile_one, args=(obj,), name=obj)
        p.start()
        running.append(p)
    for p in running:
        p.join()
        if p.exitcode != 0:
            failed.append(p.name)
    if failed:
        raise CompileError(f"failed to compile {failed}")
    return objects


ccompiler.CCompiler.compile = parallel_compile
sys.argv = ["setup.py"] + sys.argv[1:]
runpy.run_path("setup.py", run_name="__main__")
EOF
    "$PY" "$WORK/parallel_setup.py" build_ext --inplace --force || return 1
  fi
  "$PY" - <<'EOF'
import torch
import vattention._C  # noqa: F401
dump = torch._C._dispatch_dump("vattention::sparse_attention")
assert "CUDA" in dump, "the CUDA kernels were not registered (built without CUDA?)\n" + dump
print("vattention._C imports; CUDA kernels registered")
EOF
}

curand_include() {
  "$PY" - <<'EOF'
import os, sys
for p in sys.path:
    for sub in ("nvidia/cu13/include", "nvidia/curand/include"):
        d = os.path.join(p, sub)
        if os.path.isfile(os.path.join(d, "curand_kernel.h")):
            print(d)
            raise SystemExit
EOF
}

step_cmake_build() {
  mkdir -p "$BUILD_DIR"
  if command -v cmake >/dev/null 2>&1; then
    local gen="Unix Makefiles"
    command -v ninja >/dev/null 2>&1 && gen="Ninja"
    cmake -S "$ROOT" -B "$BUILD_DIR" -G "$gen" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_COMPILER="$NVCC" -DPython3_EXECUTABLE="$PY" -DVATTENTION_EMU_TESTS=OFF || return 1
    cmake --build "$BUILD_DIR" -j "$MAX_JOBS" || return 1
  else
    echo "no cmake: building the benchmarks with nvcc directly"
    local inc gencode="" a
    inc="$(curand_include)"
    for a in $ARCHS; do gencode="$gencode -gencode=arch=compute_${a},code=sm_${a}"; done
    local flags="-std=c++17 -O3 --use_fast_math -lineinfo --expt-relaxed-constexpr -DVATTENTION_WITH_CUDA -I$ROOT/csrc ${inc:+-I$inc} $gencode"
    mkdir -p "$BUILD_DIR/obj"
    local srcs=("$ROOT"/csrc/vattention/*_cuda.cu "$ROOT"/csrc/vattention/*_cpu.cpp)
    printf '%s\n' "${srcs[@]}" | xargs -P "$MAX_JOBS" -I{} sh -c \
      "\"$NVCC\" $flags -x cu -c {} -o \"$BUILD_DIR/obj/\$(basename {}).o\"" || return 1
    for b in bench_select_topk bench_sparse_attention bench_key_summary; do
      "$NVCC" $flags -c "$ROOT/benchmarks/cpp/$b.cu" -o "$BUILD_DIR/obj/$b.o" || return 1
      "$NVCC" $gencode "$BUILD_DIR/obj/$b.o" "$BUILD_DIR"/obj/*_c*.o -o "$BUILD_DIR/$b" || return 1
    done
  fi
  ls -la "$BUILD_DIR/bench_select_topk" "$BUILD_DIR/bench_sparse_attention" "$BUILD_DIR/bench_key_summary"
}

step_op_timings() {
  "$PY" - "$OUT/op_timings.json" <<'EOF'
"""torch.ops.vattention CUDA ops against their PyTorch baselines: torch.topk and dense SDPA."""
import json, math, sys
import torch
import torch.nn.functional as F
from vattention import ops

def median_ms(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]

def graph_ms(fn, iters=50):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return median_ms(g.replay, iters)

res = {"device": torch.cuda.get_device_name(0)}
rows, n = 32, 131072
scores = torch.randn(rows, n, device="cuda")
starts = torch.zeros(rows, dtype=torch.int32, device="cuda")
ends = torch.full((rows,), n, dtype=torch.int32, device="cuda")
for k in (6553, 64):
    ks = torch.full((rows,), k, dtype=torch.int32, device="cuda")
    ours = median_ms(lambda: ops.select_topk(scores, starts, ends, ks, k))
    ours_graph = graph_ms(lambda: ops.select_topk(scores, starts, ends, ks, k))
    ref = median_ms(lambda: torch.topk(scores, k, dim=-1, sorted=False))
    res[f"topk_k{k}"] = {"vattention_ms": ours, "vattention_graph_ms": ours_graph,
                         "torch_topk_ms": ref, "speedup": ref / ours}
    print(f"select_topk 32x131072 fp32 k={k}: vattention {ours:.4f} ms (graph {ours_graph:.4f}), "
          f"torch.topk {ref:.4f} ms, speedup {ref / ours:.2f}x")

B, hq, hkv, d, count = 1, 32, 8, 128, 13107
q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, hkv, n, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(B, hkv, n, d, device="cuda", dtype=torch.bfloat16)
idx = torch.stack([torch.randperm(n, device="cuda")[:count].sort().values for _ in range(hkv)])
idx = idx.to(torch.int32)[None].contiguous()
counts = torch.full((B, hkv), count, dtype=torch.int32, device="cuda")
scale = 1 / math.sqrt(d)
attn = lambda: ops.sparse_attention(q, k, v, idx, None, counts, scale, 0)
ours = median_ms(attn)
ours_graph = graph_ms(attn)
sdpa = median_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
gathered = B * hkv * count * 2 * d * 2
res["sparse_attention_10pct"] = {"vattention_ms": ours, "vattention_graph_ms": ours_graph,
                                 "sdpa_dense_ms": sdpa, "gathered_bytes": gathered,
                                 "gbps": gathered / (ours * 1e-3) / 1e9,
                                 "gbps_graph": gathered / (ours_graph * 1e-3) / 1e9}
print(f"sparse_attention B=1 32/8 D=128 bf16 10% of 131072: {ours:.4f} ms (graph "
      f"{ours_graph:.4f} ms, {gathered / (ours_graph * 1e-3) / 1e9:.0f} GB/s), "
      f"dense SDPA {sdpa:.4f} ms")
json.dump(res, open(sys.argv[1], "w"), indent=1)
EOF
}

find_sanitizer() {
  local c
  c="$(command -v compute-sanitizer || true)"
  if [ -z "$c" ]; then
    for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
             "$(dirname "${NVCC:-/nonexistent/x}")/compute-sanitizer" \
             "$(dirname "$(readlink -f "${NVCC:-/nonexistent/x}")")/compute-sanitizer" \
             /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
             /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer; do
      if [ -x "$c" ]; then echo "$c"; return; fi
    done
    c="$("$PY" -c "import glob, sys; h=[g for p in sys.path for g in glob.glob(p + '/nvidia/*/bin/compute-sanitizer')]; print(h[0] if h else '')" 2>/dev/null)"
  fi
  echo "$c"
}

# sanitize TOOL CMD...: compute-sanitizer restricted to the vattention kernels when the
# option exists; fails on any reported error.
step_sanitize() {
  local tool=$1
  shift
  if [ -z "$SANITIZER" ]; then
    echo "compute-sanitizer not found: skipped"
    return 77
  fi
  local filter=()
  if "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name "; then
    filter=(--kernel-name kns=vattention)
  fi
  local extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check no)
  "$SANITIZER" --tool "$tool" --error-exitcode 99 "${filter[@]}" "${extra[@]}" "$@"
}

# Tests are found by marker under tests/ (tests/<stage>/...), never by file name.
step_pytest_cuda() {
  "$PY" -m pytest tests -m cuda -q -rs -p no:cacheprovider \
    --junitxml="$OUT/junit_cuda.xml" --durations=10
}

step_pytest_rest() {
  "$PY" -m pytest tests -m "not cuda" -q -rs -p no:cacheprovider \
    --junitxml="$OUT/junit_rest.xml" --durations=15
}

step_bench_decode() {
  if [ ! -f benchmarks/bench_decode.py ]; then
    echo "benchmarks/bench_decode.py does not exist: skipped"
    return 77
  fi
  # Batch 16 at 128K is where the top-k's uncached path and the split balance show; the
  # full default sweep (8K too, batch 4) does not fit the budget.
  "$PY" benchmarks/bench_decode.py --contexts 32768,131072 --batches 1,16 --repeats 10 \
    --json "$OUT/bench_decode.json" --plot "$OUT/bench_decode.png"
}

step_bench_decode_8k() {
  "$PY" benchmarks/bench_decode.py --contexts 8192 --batches 1,4,16 --repeats 10 \
    --json "$OUT/bench_decode_8k.json"
}

export -f step_env step_build_ext step_cmake_build step_op_timings step_sanitize \
  step_pytest_cuda step_pytest_rest step_bench_decode step_bench_decode_8k curand_include
export ROOT OUT WORK BUILD_DIR

# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------

echo "[gpu_check] output in $OUT, budget ${BUDGET}s, python $PY"
run_step env 30 bash -c step_env

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  for step in build_ext cmake_build pytest_cuda sanitize_memcheck_py pytest_rest bench_decode \
              op_timings bench_cpp sanitizers; do
    record SKIP "$step" 0 "no CUDA device visible to torch"
  done
  rm -rf "$WORK"
  echo "[gpu_check] no CUDA device: every GPU step skipped. summary:"
  cat "$SUMMARY"
  exit 0
fi

run_step cmake_build 240 bash -c step_cmake_build &
CMAKE_PID=$!
run_step build_ext 260 bash -c step_build_ext
BUILD_OK=$?

SANITIZER="$(find_sanitizer)"
export SANITIZER
echo "compute-sanitizer: ${SANITIZER:-not found}" >> "$OUT/env.log"

# Correctness first: every CUDA test, then one memcheck while the rest of the suite runs.
if (( BUILD_OK == 0 )); then
  run_step pytest_cuda 150 bash -c step_pytest_cuda
  run_step pytest_rest 150 bash -c step_pytest_rest &
  REST_PID=$!
  run_step sanitize_memcheck_py 100 bash -c 'step_sanitize memcheck "$PY" scripts/sanitizer_case.py'
  wait "$REST_PID"
else
  record SKIP pytest 0 "the extension did not build (see build_ext.log)"
fi

# Benchmarks only now: nothing else runs on the GPU while they time.
if (( BUILD_OK == 0 )); then
  # The CUDA kernels, memsets and memcpys one default step launches (issue 8: <= 12),
  # at batch 1 and 16, 128K.
  run_step profile_kernels 40 bash -c '"$PY" benchmarks/profile_kernels.py --batch 1 &&
    "$PY" benchmarks/profile_kernels.py --batch 16'
  run_step bench_decode 100 bash -c step_bench_decode
  # 8K, where sparse must stay within 1.1x of dense (dense_below: the device-side fallback).
  run_step bench_decode_8k 60 bash -c step_bench_decode_8k
  run_step op_timings 60 bash -c step_op_timings
fi
wait "$CMAKE_PID"
if [ -x "$BUILD_DIR/bench_select_topk" ]; then
  run_step bench_select_topk_f32 45 "$BUILD_DIR/bench_select_topk" --json "$OUT/bench_select_topk_f32.json"
  run_step bench_select_topk_bf16 45 "$BUILD_DIR/bench_select_topk" --dtype bf16 --json "$OUT/bench_select_topk_bf16.json"
  run_step bench_sparse_attention 60 "$BUILD_DIR/bench_sparse_attention" \
    --json "$OUT/bench_sparse_attention.json"
  # The serving shapes (issue 8): B = 1, 4, 16 x N = 8K, 32K, 128K, bf16, 32/8 heads,
  # D = 128, 10% of the rows; top-k rows = B x 8 shared lists. No CPU check (time).
  run_step bench_cpp_sweep 90 bash -c '
    for b in 1 4 16; do for n in 8192 32768 131072; do
      "$BUILD_DIR/bench_sparse_attention" --batch $b --length $n --iters 20 --no-check \
        --json "$OUT/bench_sparse_attention_B${b}_N${n}.json" | grep -E "^(sparse_attention|  partials)"
      "$BUILD_DIR/bench_select_topk" --dtype bf16 --rows $((8 * b)) --length $n \
        --k $((n / 20)) --iters 20 --no-check --json "$OUT/bench_select_topk_B${b}_N${n}.json" |
        grep -E "^select_topk"
    done; done'
  if [ -x "$BUILD_DIR/bench_key_summary" ]; then
    run_step bench_key_summary 45 "$BUILD_DIR/bench_key_summary" --json "$OUT/bench_key_summary.json"
  fi
else
  record SKIP bench_cpp 0 "no benchmark binaries (see cmake_build.log)"
fi

# Whatever budget is left: the other sanitizer runs.
if (( BUILD_OK == 0 )); then
  run_step sanitize_racecheck_py 100 bash -c 'step_sanitize racecheck "$PY" scripts/sanitizer_case.py'
fi
if [ -x "$BUILD_DIR/bench_select_topk" ]; then
  for b in bench_select_topk bench_sparse_attention bench_key_summary; do
    [ -x "$BUILD_DIR/$b" ] || continue
    run_step "sanitize_memcheck_$b" 60 bash -c "step_sanitize memcheck \"$BUILD_DIR/$b\" --tiny"
    run_step "sanitize_racecheck_$b" 60 bash -c "step_sanitize racecheck \"$BUILD_DIR/$b\" --tiny"
  done
fi

# ---------------------------------------------------------------------------------------
# headline numbers
# ---------------------------------------------------------------------------------------
{
  echo
  echo "total wall time: $(( $(date +%s) - START ))s of ${BUDGET}s"
  for f in "$OUT"/pytest_cuda.log "$OUT"/pytest_rest.log; do
    [ -f "$f" ] && echo "$(basename "$f" .log): $(grep -E '(passed|failed|error|skipped)' "$f" | tail -1)"
  done
  f="$OUT"/sanitize_memcheck_py.log
  [ -f "$f" ] && echo "sanitize_memcheck_py: $(grep -E 'ERROR SUMMARY|mismatches|all ops match|skipped' "$f" | tr '\n' ' ')"
  f="$OUT"/profile_kernels.log
  [ -f "$f" ] && grep -E '^(shape|CUDA kernels per decode step)' "$f"
  for f in "$OUT"/bench_decode.log "$OUT"/bench_decode_8k.log "$OUT"/bench_select_topk_f32.log "$OUT"/bench_select_topk_bf16.log \
           "$OUT"/bench_sparse_attention.log "$OUT"/bench_cpp_sweep.log "$OUT"/bench_key_summary.log "$OUT"/op_timings.log; do
    [ -f "$f" ] && grep -E '^(B=|        stages|select_topk|sparse_attention|device-to-device|  partials|  check|llama3|gemma3)' "$f"
  done
} >> "$SUMMARY" 2>/dev/null
rm -rf "$WORK"
echo "[gpu_check] summary:"
cat "$SUMMARY"

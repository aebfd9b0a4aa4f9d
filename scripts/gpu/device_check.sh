#!/usr/bin/env bash
# The GPU half of issue 7 on a lent GPU machine (docs/performance.md, "GPU"), in stages:
#   build  MegaBlocks, grouped_gemm and stanford-stk from the sdists in .whl/ (scripts/gpu/fetch_sources.py),
#          with the machine's nvcc, against its torch, into /tmp/dbrx_gpu_site
#   test   the CUDA tests (megablocks vs torch backend; torch backend on CUDA vs CPU)
#   diag   scripts/gpu/grad_error_vs_fp32.py: each backend's whole-model bf16 gradients against fp32
#   bench  scripts/bench/bench_gpu.py: ~1B-active DBRX step, torch vs megablocks vs transformers
#          (4.57 from .whl/ when there, as our users run it; else the image's)
#   all    (the default) the three in the least device time: the builds use a few CPU cores and no GPU,
#          so the peers that need no MegaBlocks are timed meanwhile; after the tests, megablocks is timed
#          against ours torch again in a second, quiet run
# `... test bench` reruns stages on a warm machine (the build stays in /tmp while the machine is held).
# No network, no Composer needed. Each stage has a time cap so one stuck stage cannot eat the lease.
# Logs and bench_gpu*.json go to $OUT (./gpu_out when OUT is unset).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-gpu_out}"
site=/tmp/dbrx_gpu_site
mkdir -p "$out" "$site"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # H100/H200; the builds skip their device query
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$site:$PWD"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)

# At most 8 files come back from a device run: stages write few, and the device line goes to stdout.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

install() {  # no deps, no index: the extensions must build against the image's torch
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" "$@"
}

build() {
  install .whl/stanford_stk-*.tar.gz > /tmp/build_stk.log 2>&1 || { echo "stanford-stk: install failed:"; tail -20 /tmp/build_stk.log; }
  # The two CUDA builds are independent: side by side.
  timeout 420 bash -c "$(declare -f install); site=$site; install .whl/grouped_gemm-*.tar.gz" \
    > "$out/build_grouped_gemm.log" 2>&1 & gg=$!
  # CUDA 13's CCCL dropped cub's `debug_synchronous` overloads, which megablocks 0.10's csrc/cumsum.h still
  # calls (seen: "no instance of overloaded function cub::DeviceScan::ExclusiveSum"). The stream-only
  # overload it falls back to exists in CUDA 12 too, so the patched source builds on both.
  mb_src=/tmp/dbrx_megablocks_src
  rm -rf "$mb_src" && mkdir -p "$mb_src" && tar xzf .whl/megablocks-*.tar.gz -C "$mb_src" --strip-components=1
  python3 - "$mb_src/csrc/cumsum.h" <<'PATCH'
import re, sys
path = sys.argv[1]
text, n = re.subn(r"stream,\s*debug_synchronous\)\)", "stream))", open(path).read())
open(path, "w").write(text)
print(f"megablocks csrc/cumsum.h: {n} cub calls without debug_synchronous")
PATCH
  timeout 420 bash -c "$(declare -f install); site=$site; install $mb_src" \
    > "$out/build_megablocks.log" 2>&1 & mb=$!
  wait $gg || { echo "grouped_gemm: build failed; the end of build_grouped_gemm.log:"; tail -20 "$out/build_grouped_gemm.log"; }
  wait $mb || { echo "megablocks: build failed; the end of build_megablocks.log:"; tail -20 "$out/build_megablocks.log"; }
  python3 -c "import megablocks.ops, grouped_gemm.ops; print('megablocks and grouped_gemm import')"
}

run_tests() {
  # --noconftest: tests/conftest.py brings in the training stack (Composer, Streaming), absent here.
  timeout 150 python3 -m pytest -q -rs --noconftest -p no:cacheprovider \
    tests/model/test_moe_megablocks.py tests/model/test_moe.py 2>&1 | tee "$out/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -15
}

bench() {  # bench [json-name] [peers]
  # transformers 4.57 (the version this project supports) over the image's 5.x, for the bench only.
  hf=/tmp/dbrx_hf457
  if [ ! -d "$hf/transformers" ] && ls .whl/transformers-4.57*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$hf" \
      .whl/transformers-*.whl .whl/tokenizers-*.whl .whl/huggingface_hub-*.whl > /tmp/install_hf.log 2>&1 \
      || { echo "transformers 4.57: install failed, the image's transformers is used:"; tail -5 /tmp/install_hf.log; }
  fi
  name="${1:-bench_gpu}"
  # BENCH_ARGS passes more options, e.g. BENCH_ARGS="--batch 8": how MFU grows with the batch.
  PYTHONPATH="$hf:$PYTHONPATH" timeout 300 python3 scripts/bench/bench_gpu.py --json "$out/$name.json" ${BENCH_ARGS:-} \
    --peers "${2:-torch,compiled,megablocks,megablocks_compiled,transformers}" 2>&1 | tee "$out/$name.txt"
}

for stage in "${stages[@]}"; do
  start=$SECONDS
  case "$stage" in
    build) build ;;
    test) run_tests ;;
    diag)  # whole-model gradients of both backends against fp32 (scripts/gpu/grad_error_vs_fp32.py)
      timeout 120 python3 scripts/gpu/grad_error_vs_fp32.py > "$out/grad_error.txt" 2>&1; tail -3 "$out/grad_error.txt" ;;
    bench) bench ;;
    all)
      build > "$out/build.txt" 2>&1 & builder=$!
      echo "== build running in the background (build.txt); timing the peers that need no MegaBlocks meanwhile"
      bench bench_gpu torch,compiled,transformers
      echo "== bench (no megablocks) took $((SECONDS - start)) s; waiting for the build"
      wait $builder; cat "$out/build.txt"
      echo "== build done at $((SECONDS - start)) s"
      run_tests
      echo "== tests done at $((SECONDS - start)) s"
      bench bench_gpu_megablocks torch,megablocks,megablocks_compiled ;;
    *) echo "unknown stage '$stage': use all, build, test, diag or bench"; exit 2 ;;
  esac
  echo "== $stage took $((SECONDS - start)) s"
done

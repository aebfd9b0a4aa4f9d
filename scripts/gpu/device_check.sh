#!/usr/bin/env bash
# The GPU half of issue 7 in one run on a lent GPU machine (see docs/performance.md, "GPU"):
# build MegaBlocks from the sdists in .whl/ (scripts/gpu/fetch_sources.py), run the CUDA tests,
# then the GPU benchmark. Needs nvcc and torch on the machine, no network, no Composer.
# Writes its logs and bench_gpu.json under $OUT (or ./gpu_out when OUT is unset).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-gpu_out}"
mkdir -p "$out"
site=/tmp/dbrx_gpu_site
mkdir -p "$site"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # H100/H200; the builds skip their device query
export MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/device.txt"

install() {  # no deps, no index: the image's torch is the one the extensions must build against
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" "$@"
}
start=$SECONDS
install .whl/stanford_stk-*.tar.gz > "$out/build_stk.log" 2>&1 || echo "stanford-stk install failed (build_stk.log)"
# The two CUDA builds are independent: run them side by side.
install .whl/grouped_gemm-*.tar.gz > "$out/build_grouped_gemm.log" 2>&1 & gg=$!
install .whl/megablocks-*.tar.gz > "$out/build_megablocks.log" 2>&1 & mb=$!
wait $gg || echo "grouped_gemm build failed (build_grouped_gemm.log)"
wait $mb || echo "megablocks build failed (build_megablocks.log)"
echo "builds took $((SECONDS - start)) s"
export PYTHONPATH="$site:$PWD"

# --noconftest: tests/conftest.py brings in the training stack (Composer, Streaming), absent here.
python3 -m pytest -q -rs --noconftest -p no:cacheprovider \
  tests/model/test_moe_megablocks.py tests/model/test_moe.py tests/model/test_dbrx.py 2>&1 | tee "$out/tests.log" | tail -40
python3 scripts/bench/bench_gpu.py --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.txt"

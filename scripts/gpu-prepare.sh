#!/usr/bin/env bash
# Before a GPU session, on this machine: what `scripts/gpu-check.sh` takes on the GPU machine,
# which has no Rust toolchain. Builds the release binary without the `mpi` feature (MPICH is not
# there), strips it into target/gpu/runtime and compiles every kernel into target/gpu/kernel-cache
# with NVRTC 13.0 (the wheel scripts/test installs, or RUNTIME_CUDA_LIB_DIR), the version the GPU
# machine's PyTorch brings, so the first start there loads the kernels instead of compiling them
# (a cache entry of another NVRTC version is not used: compiling all takes about a minute).
#
#     scripts/gpu-prepare.sh [ARCH]      (default sm_90: H100 and H200)
#
# Then, on the device machine (carry target/gpu), one call:
#
#     GPU_CHECK_PACK=$OUT scripts/gpu-check.sh target/gpu/runtime /tmp/gpu-check-out
#
# which prints the summary at the end and leaves in $OUT the summary, the log of every part's
# status and a tarball of the outputs (model files and the kernel cache left out).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${1:-sm_90}
cargo build --release --quiet -p runtime
mkdir -p target/gpu
strip -o target/gpu/runtime target/release/runtime
if ldd target/gpu/runtime | grep -qi mpich; then
    echo "target/gpu/runtime links MPICH (the mpi feature): the GPU machine has no MPICH" >&2; exit 1
fi
LIB=${RUNTIME_CUDA_LIB_DIR:-$(ls -d target/cuda-wheels/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1 || true)}
if [ -z "$LIB" ] || [ ! -f "$LIB/libnvrtc.so.13" ]; then
    echo "no NVRTC 13.0 (run scripts/test once to install its wheel, or set RUNTIME_CUDA_LIB_DIR)" >&2; exit 1
fi
RUNTIME_KERNEL_CACHE_DIR=target/gpu/kernel-cache LD_LIBRARY_PATH="$LIB" target/gpu/runtime kernels --cache --arch "$ARCH"
# which code the GPU run measures (gpu-check.sh copies it into its status log)
DIRTY=$(git status --porcelain -- runtime kernels Cargo.toml Cargo.lock .cargo)
echo "$(git rev-parse HEAD)${DIRTY:+ with uncommitted changes}" > target/gpu/COMMIT
du -sh target/gpu/runtime target/gpu/kernel-cache
cat target/gpu/COMMIT
echo "on the GPU machine (carry target/gpu): GPU_CHECK_PACK=\$OUT scripts/gpu-check.sh target/gpu/runtime /tmp/gpu-check-out"

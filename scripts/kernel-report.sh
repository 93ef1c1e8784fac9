#!/usr/bin/env bash
# Compiles every kernels/*.cu (with kernels/common.cuh prepended, as the runtime does) for sm_90 and
# sm_80 with ptxas in verbose mode, and prints a markdown table of registers, shared memory and
# spills per kernel. Any compiler warning or error is printed and makes the script fail.
#
# Usage: scripts/kernel-report.sh [CUDA_WHEEL_DIR]
#   CUDA_WHEEL_DIR (or env CUDA_WHEEL): a CUDA toolkit directory laid out as the `nvidia-cuda-*`
#   pip wheels install it (`.../site-packages/nvidia/cu13`): lib/libnvrtc.so.* and, for the nvcc
#   mode, bin/nvcc. Default: the `cu13` (or `cuda_nvrtc`) folder of an importable `nvidia` package.
#   Env COMPILER=nvrtc (default): NVRTC through ctypes, with the runtime's options
#     (-std=c++17 --fmad=false --gpu-architecture=sm_XX) plus -Xptxas -v. Needs python3.
#   Env COMPILER=nvcc: `nvcc -std=c++17 --fmad=false -arch=sm_XX -cubin -Xptxas -v` (needs matching nvcc,
#     cicc and ptxas versions).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheel="${1:-${CUDA_WHEEL:-}}"
if [[ -z "$wheel" ]]; then
    wheel="$(python3 - <<'EOF' 2>/dev/null || true
import os
import nvidia
for base in nvidia.__path__:
    for sub in ("cu13", "cu12", "cuda_nvrtc"):
        if os.path.isdir(os.path.join(base, sub, "lib")):
            print(os.path.join(base, sub))
            raise SystemExit
EOF
)"
fi
if [[ -z "$wheel" || ! -d "$wheel" ]]; then
    echo "kernel-report: no CUDA wheel directory (pass it as an argument or set CUDA_WHEEL)" >&2
    exit 2
fi
compiler="${COMPILER:-nvrtc}"
archs=(sm_90 sm_80)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# NVRTC driver: compiles $2 (source) with the remaining options; prints the program log.
cat >"$tmp/nvrtc.py" <<'EOF'
import ctypes, glob, os, sys
wheel, src_path = sys.argv[1], sys.argv[2]
opts = [o.encode() for o in sys.argv[3:]]
libs = sorted(p for p in glob.glob(os.path.join(wheel, "lib", "libnvrtc.so*")) if "builtins" not in p and ".alt." not in p)
if not libs:
    sys.exit(f"no libnvrtc.so in {wheel}/lib")
lib = ctypes.CDLL(libs[0])
src = open(src_path, "rb").read()
prog = ctypes.c_void_p()
if lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(src_path).encode(), 0, None, None) != 0:
    sys.exit("nvrtcCreateProgram failed")
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
sys.stdout.write(log.value.decode(errors="replace"))
sys.exit(1 if rc != 0 else 0)
EOF

version=""
if [[ "$compiler" == nvcc ]]; then
    version="$("$wheel/bin/nvcc" --version | tail -n 2 | head -n 1)"
else
    version="$(python3 - "$wheel" <<'EOF'
import ctypes, glob, os, sys
libs = sorted(p for p in glob.glob(os.path.join(sys.argv[1], "lib", "libnvrtc.so*")) if "builtins" not in p and ".alt." not in p)
lib = ctypes.CDLL(libs[0])
a, b = ctypes.c_int(), ctypes.c_int()
lib.nvrtcVersion(ctypes.byref(a), ctypes.byref(b))
print(f"NVRTC {a.value}.{b.value}")
EOF
)"
fi

status=0
rows=()
for src in "$root"/kernels/*.cu; do
    name="$(basename "$src")"
    cat "$root/kernels/common.cuh" "$src" >"$tmp/$name"
    for arch in "${archs[@]}"; do
        log="$tmp/${name%.cu}.$arch.log"
        if [[ "$compiler" == nvcc ]]; then
            ok=0
            PATH="$wheel/bin:$PATH" nvcc -std=c++17 --fmad=false -arch="$arch" -cubin -Xptxas -v -o "$tmp/out.cubin" "$tmp/$name" >"$log" 2>&1 || ok=1
        else
            ok=0
            LD_LIBRARY_PATH="$wheel/lib:${LD_LIBRARY_PATH:-}" python3 "$tmp/nvrtc.py" "$wheel" "$tmp/$name" \
                -std=c++17 --fmad=false "--gpu-architecture=$arch" -Xptxas -v >"$log" 2>&1 || ok=1
        fi
        if [[ $ok -ne 0 ]] || grep -qiE '(^|[^a-z])(warning|error)' "$log"; then
            echo "kernel-report: $name ($arch):" >&2
            grep -v '^ptxas' "$log" | grep -iE 'warning|error|^' >&2 || true
            status=1
        fi
        # ptxas -v: "Compiling entry function 'X' for 'sm_90'", then "N bytes stack frame, S bytes
        # spill stores, L bytes spill loads" and "Used R registers, ..., M bytes smem, ..."
        while IFS=$'\t' read -r kernel regs smem stack spills spilll; do
            rows+=("| $name | \`$kernel\` | $arch | $regs | $smem | $stack | $spills / $spilll |")
        done < <(awk '
            /Compiling entry function/ { if (k != "") print k "\t" r "\t" s "\t" st "\t" ss "\t" sl;
                                         match($0, /function .[^'"'"']*/); k = substr($0, RSTART + 10, RLENGTH - 10);
                                         r = 0; s = 0; st = 0; ss = 0; sl = 0 }
            /bytes stack frame/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "bytes" && $(i+2) == "stack") st = $i;
                                                              if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "stores,") ss = $i;
                                                              if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "loads") sl = $i } }
            /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) { if ($i == "Used") r = $(i+1);
                                                                  if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) s = $i } }
            END { if (k != "") print k "\t" r "\t" s "\t" st "\t" ss "\t" sl }' "$log")
    done
done

echo "Compiled with $version, \`-std=c++17 --fmad=false\` (the runtime's options), for ${archs[*]}."
echo
echo "| file | kernel | arch | registers | shared memory (bytes) | stack (bytes) | spill stores / loads (bytes) |"
echo "|---|---|---|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
exit $status

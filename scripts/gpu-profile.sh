#!/usr/bin/env bash
# Per-kernel GPU time of a few training steps, on a machine with an NVIDIA GPU and Nsight Compute:
#
#     scripts/gpu-profile.sh OUT_NAME STEPS -- runtime bench ... --device cuda --steps S --warmup W
#
# Runs the command under `ncu` (each kernel timed alone, the clocks left as they are), then prints
# the kernels grouped by name: launches and milliseconds per step, largest first, and the total.
# With two steps or more that is the last step alone (a step ends with the fused AdamW launch);
# otherwise the launches over STEPS (S + W, the steps the command runs in all). The CSV and the table go to OUT_NAME.csv and
# OUT_NAME.md. The CUDA libraries come from the PyTorch install, as in scripts/gpu-check.sh; set
# RUNTIME_KERNEL_CACHE_DIR to gpu-check's cache so the kernels are loaded, not compiled.
set -uo pipefail
OUT_NAME=$1; STEPS=$2; shift 2
[ "${1:-}" = "--" ] && shift
NV_LIBS=$(${PYTHON:-python3} - <<'PY' 2>/dev/null
import glob, os, site
dirs = []
for base in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
print(":".join(dict.fromkeys(dirs)))
PY
)
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine" >&2; exit 2; }
"$NCU" --clock-control none --metrics gpu__time_duration.sum --csv "$@" >"$OUT_NAME.csv" 2>"$OUT_NAME.err"
rc=$?
${PYTHON:-python3} - "$OUT_NAME.csv" "$STEPS" <<'PY' | tee "$OUT_NAME.md"
import csv, sys, collections
path, steps = sys.argv[1], int(sys.argv[2])
scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
rows = [l for l in open(path, errors="replace") if l.startswith('"')]
launches = []
for r in csv.DictReader(rows):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        ms = float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1.0)
        launches.append((r["Kernel Name"].split("(")[0][:90], ms))
# each training step ends with the one fused AdamW launch: with two or more, only the last step
# counts (the launches after the one before it), so the first step's one-off work is left out
ends = [i for i, (name, _) in enumerate(launches) if name == "adamw_multi"]
if len(ends) >= 2:
    launches, steps = launches[ends[-2] + 1 : ends[-1] + 1], 1
    print(f"the last of {len(ends)} steps")
by = collections.defaultdict(lambda: [0, 0.0])
for name, ms in launches:
    by[name][0] += 1
    by[name][1] += ms
total = sum(v[1] for v in by.values())
print(f"| kernel | launches / step | ms / step | share |\n|---|---|---|---|")
for name, (n, ms) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    if ms / total < 0.002:
        continue
    print(f"| {name} | {n / steps:.0f} | {ms / steps:.3f} | {ms / total * 100:.1f}% |")
print(f"\ntotal: {sum(v[0] for v in by.values()) / steps:.0f} launches, {total / steps:.2f} ms of kernels per step")
PY
exit $rc

"""CPU training benchmark, side by side: `runtime bench` and the same shapes in PyTorch
(`scripts/pytorch_train.py`), alternating in one run on the same machine, and a markdown table
with the ratios. Shapes: 6 layers, width 384, 6 heads, vocab 8192, sequence 256, batch 8.

    cargo build --release
    python scripts/bench_cpu.py [--steps 5] [--rounds 2]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default=str(ROOT / "target" / "release" / "runtime"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; the best is kept")
    ap.add_argument("--attn_implementation", default="sdpa")
    a = ap.parse_args()
    rows = []
    for arch in ["gpt2", "llama"]:
        ours, theirs = [], []
        for _ in range(a.rounds):
            ours.append(run_json([a.runtime, "bench", "--arch", arch, "--steps", str(a.steps), "--attn_implementation", a.attn_implementation, "--json"]))
            theirs.append(run_json([sys.executable, str(ROOT / "scripts" / "pytorch_train.py"), "--arch", arch, "--steps", str(a.steps), "--attn_implementation", a.attn_implementation]))
        o = max(ours, key=lambda r: r["tokens_per_second"])
        t = max(theirs, key=lambda r: r["tokens_per_second"])
        rows.append((arch, o, t))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; PyTorch {rows[0][2]['torch']}; attention `{a.attn_implementation}`; best of {a.rounds} alternating runs of {a.steps} steps\n")
    print("| model | params | runtime tokens/s | PyTorch tokens/s | ratio | runtime peak RSS | PyTorch peak RSS | runtime matmul GFLOP/s (share of step) | GEMM rate: runtime / PyTorch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch, o, t in rows:
        print(f"| {arch} | {o['parameters'] / 1e6:.1f}M | {o['tokens_per_second']:.0f} | {t['tokens_per_second']:.0f} | {o['tokens_per_second'] / t['tokens_per_second']:.2f}x "
              f"| {o['peak_rss_mib']:.0f} MiB | {t['peak_rss_mib']:.0f} MiB | {o['matmul_gflops']:.0f} ({100 * o['matmul_share']:.0f}%) "
              f"| {o['machine_gemm_gflops']:.0f} / {t['machine_gemm_gflops']:.0f} GFLOP/s |")
    print()
    for arch, o, _ in rows:
        ops = sorted(o["ops"], key=lambda x: -x[1])
        print(f"{arch} step time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in ops if v >= 0.005))


if __name__ == "__main__":
    main()

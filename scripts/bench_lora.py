"""LoRA training benchmark, side by side in one run: `runtime bench --arch llama` training every
weight, the same with a LoRA adapter (`--lora_r 16`, every linear module), and PyTorch +
peft training the same adapter on the same shapes (`scripts/pytorch_train.py --lora_r 16`),
alternating A B C C B A over the rounds on the same machine. Prints a markdown table with the
ratios (best run of each side). Shapes: `runtime bench`'s Llama (6 layers, width 384, 6 heads,
vocab 8192, sequence 256, batch 8).

    cargo build --release
    python scripts/bench_lora.py [--steps 5] [--rounds 2] [--lora_r 16] [--lora_torch_dtype bfloat16]
"""

import argparse
import os
import sys
from pathlib import Path

from bench_cpu import ROOT, cpu_name, run_json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default=str(ROOT / "target" / "release" / "runtime"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="A B C C B A rounds; the best run of each side is kept")
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--lora_torch_dtype", help="the runtime LoRA side's --torch_dtype (bfloat16: the frozen base held in bf16)")
    for k in ["n_layer", "hidden", "n_head", "vocab", "seq", "batch"]:
        ap.add_argument(f"--{k}", type=int, help="a shape other than the default (both sides)")
    a = ap.parse_args()
    shape = [x for k in ["n_layer", "hidden", "n_head", "vocab", "seq", "batch"] if getattr(a, k) is not None for x in (f"--{k}", str(getattr(a, k)))]
    ckpt = ["--gradient_checkpointing"] if a.gradient_checkpointing else []
    sides = {
        "full": [a.runtime, "bench", "--arch", "llama", "--steps", str(a.steps), "--json", *ckpt, *shape],
        "lora": [a.runtime, "bench", "--arch", "llama", "--steps", str(a.steps), "--lora_r", str(a.lora_r), "--json", *ckpt, *shape,
                 *(["--torch_dtype", a.lora_torch_dtype] if a.lora_torch_dtype else [])],
        "peft": [sys.executable, str(ROOT / "scripts" / "pytorch_train.py"), "--arch", "llama", "--steps", str(a.steps), "--lora_r", str(a.lora_r), *shape],
    }
    runs = {k: [] for k in sides}
    order = list(sides)
    for _ in range(a.rounds):
        for k in order + order[::-1]:
            runs[k].append(run_json(sides[k]))
    best = {k: max(v, key=lambda r: r["tokens_per_second"]) for k, v in runs.items()}
    f, l, p = best["full"], best["lora"], best["peft"]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; PyTorch {p['torch']}; LoRA r {a.lora_r} on every linear module; {l['parameters'] / 1e6:.1f}M parameters; "
          f"shape {' '.join(shape) or 'default'}; "
          f"{'gradient checkpointing; ' if ckpt else ''}{'runtime LoRA base in ' + a.lora_torch_dtype + '; ' if a.lora_torch_dtype else ''}best of {2 * a.rounds} runs of {a.steps} steps per side, alternating\n")
    print("| run | tokens/s | step time | peak RSS |")
    print("| --- | --- | --- | --- |")
    for name, r in [("runtime, every weight", f), (f"runtime, LoRA r {a.lora_r}", l), (f"PyTorch + peft, LoRA r {a.lora_r}", p)]:
        print(f"| {name} | {r['tokens_per_second']:.0f} | {r['step_seconds']:.3f} s | {r['peak_rss_mib']:.0f} MiB |")
    print()
    print(f"runtime LoRA / runtime full: step time {l['step_seconds'] / f['step_seconds']:.2f}x, peak RSS {l['peak_rss_mib'] / f['peak_rss_mib']:.2f}x; "
          f"runtime LoRA / PyTorch + peft: tokens/s {l['tokens_per_second'] / p['tokens_per_second']:.2f}x, peak RSS {l['peak_rss_mib'] / p['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()

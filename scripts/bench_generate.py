"""Decode benchmark, side by side: `runtime bench --decode` and `transformers.generate` with its
KV cache (`scripts/pytorch_generate.py`), the engine benchmark's shapes (6 layers, width 384,
6 heads, vocab 8192), random 32-token prompts, greedy, 64 new tokens, batch 1 and 8, alternating
in one run on the same machine. Prints a markdown table with the ratios.

    cargo build --release
    python scripts/bench_generate.py [--rounds 2]
"""

import argparse
import os
import sys

from bench_cpu import ROOT, run_json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default=str(ROOT / "target" / "release" / "runtime"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    a = ap.parse_args()
    rows = []
    for arch in ["llama", "gpt2"]:
        for batch in [1, 8]:
            ours, theirs = [], []
            for _ in range(a.rounds):
                ours.append(run_json([a.runtime, "bench", "--arch", arch, "--decode", str(a.new_tokens), "--prompt", str(a.prompt),
                                      "--batch", str(batch), "--steps", "3", "--json"]))
                theirs.append(run_json([sys.executable, str(ROOT / "scripts" / "pytorch_generate.py"), "--arch", arch, "--batch", str(batch),
                                        "--new_tokens", str(a.new_tokens), "--prompt", str(a.prompt)]))
            o = max(ours, key=lambda r: r["decode_tokens_per_second"])
            t = max(theirs, key=lambda r: r["decode_tokens_per_second"])
            rows.append((arch, batch, o, t))
    print(f"{os.cpu_count()} cores; PyTorch {rows[0][3]['torch']}; prompt {a.prompt}, {a.new_tokens} new tokens, greedy; best of {a.rounds} alternating runs\n")
    print("| model | batch | runtime decode tokens/s | transformers decode tokens/s | ratio | runtime end to end | transformers end to end | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch, batch, o, t in rows:
        print(f"| {arch} | {batch} | {o['decode_tokens_per_second']:.0f} | {t['decode_tokens_per_second']:.0f} | {o['decode_tokens_per_second'] / t['decode_tokens_per_second']:.2f}x "
              f"| {o['end_to_end_tokens_per_second']:.0f} | {t['end_to_end_tokens_per_second']:.0f} | {o['end_to_end_tokens_per_second'] / t['end_to_end_tokens_per_second']:.2f}x |")


if __name__ == "__main__":
    main()

"""T5 training step on the CPU, side by side: `runtime bench --arch t5` and the same model,
batch and update in PyTorch + transformers (`T5ForConditionalGeneration`, AdamW, gradient
clipping at 1), alternating in one run on the same machine; prints a markdown table with the
ratio. Shape: T5 v1.1 (gated GELU; the head tied, as transformers 5 builds a T5 from a config), 4 encoder and 4 decoder layers, d_model 256,
4 heads, d_ff 512, vocab 8192, batch 8, sources of 128 tokens, targets of 64.

    cargo build --release
    python scripts/bench_t5.py [--steps 5] [--rounds 2]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"n_layer": 4, "hidden": 256, "n_head": 4, "vocab": 8192, "seq": 128, "batch": 8}


def pytorch(steps, warmup):
    import resource

    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.set_num_threads(os.cpu_count())
    s = SHAPE
    cfg = T5Config(vocab_size=s["vocab"], d_model=s["hidden"], d_kv=s["hidden"] // s["n_head"], d_ff=2 * s["hidden"],
                   num_layers=s["n_layer"], num_heads=s["n_head"], feed_forward_proj="gated-gelu", dropout_rate=0.0,
                   decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, s["vocab"], (s["batch"], s["seq"]), generator=g)
    labels = torch.randint(2, s["vocab"], (s["batch"], s["seq"] // 2), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens = s["batch"] * (s["seq"] + s["seq"] // 2)
    return {"parameters": sum(p.numel() for p in model.parameters()), "step_seconds": step_s, "tokens_per_second": tokens / step_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


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
    ap.add_argument("--pytorch-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.pytorch_only:
        print(json.dumps(pytorch(a.steps, 1)))
        return
    ours, theirs = [], []
    for _ in range(a.rounds):
        cmd = [a.runtime, "bench", "--arch", "t5", "--steps", str(a.steps), "--json"] + [x for k, v in SHAPE.items() for x in (f"--{k}", str(v))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        ours.append(json.loads(out.stdout.strip().splitlines()[-1]))
        out = subprocess.run([sys.executable, __file__, "--pytorch-only", "--steps", str(a.steps)], capture_output=True, text=True, check=True)
        theirs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    o = max(ours, key=lambda r: r["tokens_per_second"])
    t = max(theirs, key=lambda r: r["tokens_per_second"])
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; PyTorch {t['torch']} ({t['threads']} threads); best of {a.rounds} alternating runs, median of {a.steps} steps each\n")
    print("| model | params | runtime s/step | PyTorch s/step | runtime tokens/s | PyTorch tokens/s | ratio | runtime peak RSS | PyTorch peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| T5 v1.1 4+4 layers, d_model 256 | {o['parameters'] / 1e6:.1f}M | {o['step_seconds']:.3f} | {t['step_seconds']:.3f} | {o['tokens_per_second']:.0f} "
          f"| {t['tokens_per_second']:.0f} | {o['tokens_per_second'] / t['tokens_per_second']:.2f}x | {o['peak_rss_mib']:.0f} MiB | {t['peak_rss_mib']:.0f} MiB |")
    assert o["parameters"] == t["parameters"], f"parameter counts differ: {o['parameters']} vs {t['parameters']}"


if __name__ == "__main__":
    main()

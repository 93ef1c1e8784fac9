"""GPU reference numbers that the runtime's CUDA path is compared against, measured on the same GPU
in one run. Prints one JSON object to stdout; progress and library chatter go to stderr.

Parts (select with --parts, default all):

  trainer  `transformers.Trainer` training GPT-2 124M (GPT2Config shapes: 12 layers, width 768,
           12 heads, vocab 50257, 1024 positions) from a fresh init, SDPA attention, bf16 autocast,
           sequence 1024, AdamW at lr 3e-4 on random token ids. Steps after the first
           --trainer-warmup are timed from on_step_begin to on_step_end (with synchronize).
  sdpa     `scaled_dot_product_attention`, causal, bf16, flash backend forced, forward and
           forward+backward at head_dim 64/128 and T 1024/4096 (B*H*T kept at 8*12*1024).
  copy     device-to-device `dst.copy_(src)` bandwidth of a 1 GiB buffer (read + write bytes).
  matmul   bf16 dense matmul TFLOP/s at GPT-2 shapes and 8192^3; the max is `bf16_matmul_tflops`,
           the denominator for MFU.

A part that fails is recorded as {"error": ...} and the others still run; the exit status is 0
unless the arguments are invalid. All parts together take well under 3 minutes on an H100.

    python scripts/gpu_reference.py [--parts trainer,sdpa,copy,matmul] [--batch 8] > reference.json
    python scripts/gpu_reference.py --dry-run    # CPU, tiny shapes: checks the code paths only
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import torch

PARTS = ("trainer", "sdpa", "copy", "matmul")


def log(msg):
    print(f"[gpu_reference] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(fn, device, warmup, iters, inner=1):
    """Runs `fn` `warmup` times, then takes `iters` samples of `inner` back-to-back calls each and
    returns the seconds per call of every sample. On CUDA a sample is timed with a pair of events
    around the `inner` calls (GPU time, launch gaps included); on CPU with perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
    return out


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cases(cases, what, measure):
    """Runs `measure(case)`, which fills in a case's numbers, for each case dict. A case that fails
    records its error and the others still run."""
    results = []
    for case in cases:
        try:
            measure(case)
        except Exception as e:
            case["error"] = f"{type(e).__name__}: {e}"
            log(f"{what} {case} failed: {case['error']}")
        results.append(case)
        release_memory()
    return results


def environment(device):
    env = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception as e:  # the trainer part reports this properly; the others don't need it
        env["transformers"] = f"unavailable: {e}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu_name=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_bytes=p.total_memory,
                   gpu_sm_count=p.multi_processor_count)
    else:
        env["gpu_name"] = None
    return env


# ---------------------------------------------------------------------------------------------
# trainer


def part_trainer(a, device):
    from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainerCallback, TrainingArguments
    import transformers

    if a.dry_run:
        shapes = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128)
    else:
        shapes = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    seq = shapes["n_positions"]
    # bos/eos default to 50256; keep them inside the tiny dry-run vocabulary.
    special = shapes["vocab_size"] - 1
    cfg = GPT2Config(**shapes, resid_pdrop=a.dropout, embd_pdrop=a.dropout, attn_pdrop=a.dropout,
                     bos_token_id=special, eos_token_id=special)

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())  # tied wte/lm_head counted once

    class RandomTokens(torch.utils.data.Dataset):
        """Fixed random token ids; labels are the inputs (the model shifts them)."""

        def __init__(self, n, seq, vocab, seed):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(0, vocab, (n, seq), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, synchronized at both ends so GPU work is counted in
        the step that launched it. `ends` also gives the loop period (data loading included)."""

        def __init__(self):
            self.t0, self.steps, self.ends = None, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            t = time.perf_counter()
            self.steps.append(t - self.t0)
            self.ends.append(t)

    total_steps = a.trainer_warmup + a.trainer_steps
    data = RandomTokens(total_steps * a.batch, seq, cfg.vocab_size, a.seed)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir,
            max_steps=total_steps,
            per_device_train_batch_size=a.batch,
            learning_rate=3e-4,
            weight_decay=0.01,
            bf16=device.type == "cuda",
            use_cpu=device.type != "cuda",
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=a.seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = trainer.train()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        opt = trainer.optimizer
        opt = getattr(opt, "optimizer", opt)  # unwrap accelerate's AcceleratedOptimizer

    steps = timer.steps[a.trainer_warmup:]
    loop = [b - e for e, b in zip(timer.ends[a.trainer_warmup - 1:], timer.ends[a.trainer_warmup:])] \
        if a.trainer_warmup > 0 else []
    step_s = statistics.median(steps)
    tokens = a.batch * seq
    report = {
        "model": "gpt2", **shapes, "dropout": a.dropout, "n_params": n_params,
        "attn_implementation": model.config._attn_implementation,
        "batch": a.batch, "seq": seq, "tokens_per_step": tokens,
        "precision": "bf16 autocast, fp32 master weights" if args.bf16 else "fp32",
        "optim": str(getattr(args.optim, "value", args.optim)),
        "optimizer_class": type(opt).__name__,
        "optimizer_fused": opt.defaults.get("fused"),
        "lr": args.learning_rate, "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps_excluded": a.trainer_warmup, "timed_steps": len(steps),
        "step_seconds": step_s,
        "step_seconds_min": min(steps),
        "step_seconds_mean": statistics.fmean(steps),
        "tokens_per_second": tokens / step_s,
        # Step-end to step-end: adds the Trainer loop and data loading between steps.
        "loop_step_seconds": statistics.median(loop) if loop else None,
        "tokens_per_second_loop": tokens / statistics.median(loop) if loop else None,
        "peak_memory_bytes": peak,
        "final_train_loss": result.training_loss,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    del trainer, model, opt, data
    return report


# ---------------------------------------------------------------------------------------------
# sdpa


def part_sdpa(a, device):
    import torch.nn.functional as F

    if a.dry_run:
        cases = [(2, 2, 64, d) for d in (16, 32)]
        dtype, warmup, iters = torch.float32, 1, 3
    else:
        # B*H*T held at 8*12*1024 so every case does the same number of query rows.
        cases = [(8, 12, 1024, d) for d in (64, 128)] + [(2, 12, 4096, d) for d in (64, 128)]
        dtype, warmup, iters = torch.bfloat16, 5, 20

    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend, ctx = "flash (forced)", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    else:
        backend, ctx = "default dispatch (CPU dry run)", contextlib.nullcontext

    def measure(case):
        b, h, t, d = case["B"], case["H"], case["T"], case["D"]
        g = torch.Generator(device=device).manual_seed(a.seed)
        q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g)

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(out, (q, k, v), dout)

        with ctx():
            fwd_s = statistics.median(time_samples(fwd, device, warmup, iters))
            fb_s = statistics.median(time_samples(fwd_bwd, device, warmup, iters))
        fwd_flops = 2 * 2 * b * h * t * t * d / 2
        total_flops = fwd_flops * 3.5  # fwd + bwd at 2.5x fwd
        case.update(fwd_ms=fwd_s * 1e3, fwd_bwd_ms=fb_s * 1e3,
                    fwd_tflops=fwd_flops / fwd_s / 1e12, fwd_bwd_tflops=total_flops / fb_s / 1e12)

    results = run_cases([{"B": b, "H": h, "T": t, "D": d} for b, h, t, d in cases], "sdpa case", measure)

    ok = [c["fwd_bwd_tflops"] for c in results if "fwd_bwd_tflops" in c]
    return {
        "backend": backend, "dtype": str(dtype).removeprefix("torch."), "causal": True, "layout": "B,H,T,D",
        "flop_convention": "fwd = 2*2*B*H*T*T*D/2 (causal half of QK^T and PV); bwd = 2.5*fwd; "
                           "fwd_bwd_tflops = 3.5*fwd / fwd_bwd time",
        "timing": f"median of {iters} after {warmup} warmup; fwd under no_grad; "
                  "fwd_bwd = forward + autograd.grad for q, k, v",
        "cases": results,
        "max_fwd_bwd_tflops": max(ok) if ok else None,
    }


# ---------------------------------------------------------------------------------------------
# copy


def part_copy(a, device):
    nbytes = (16 << 20) if a.dry_run else (1 << 30)
    warmup, iters = (1, 3) if a.dry_run else (3, 10)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    s = time_samples(lambda: dst.copy_(src), device, warmup, iters)
    med = statistics.median(s)
    ok = bool(torch.equal(dst[:4096], src[:4096]))
    del src, dst
    return {
        "buffer_bytes": nbytes, "op": "dst.copy_(src)", "bytes_counted": "read + write (2 * buffer_bytes)",
        "seconds": med, "gb_per_s": 2 * nbytes / med / 1e9, "gb_per_s_best": 2 * nbytes / min(s) / 1e9,
        "timing": f"median of {iters} after {warmup} warmup", "verified": ok,
    }


# ---------------------------------------------------------------------------------------------
# matmul


def part_matmul(a, device):
    if a.dry_run:
        shapes = [("tiny", 256, 64, 256), ("tiny_square", 256, 256, 256)]
        dtype, warmup, iters, inner = torch.float32, 1, 3, 2
    else:
        # (name, M, K, N): A is MxK, B is KxN, M = 8 sequences of 1024 tokens.
        shapes = [
            ("mlp_up 8192x768@768x3072", 8192, 768, 3072),
            ("mlp_down 8192x3072@3072x768", 8192, 3072, 768),
            ("qkv 8192x768@768x2304", 8192, 768, 2304),
            ("lm_head 8192x768@768x50257", 8192, 768, 50257),
            ("square 8192^3", 8192, 8192, 8192),
        ]
        dtype, warmup, iters, inner = torch.bfloat16, 5, 10, 10

    def measure(case):
        m, k, n = case["M"], case["K"], case["N"]
        g = torch.Generator(device=device).manual_seed(a.seed)
        x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
        w = torch.randn(k, n, device=device, dtype=dtype, generator=g)
        out = torch.empty(m, n, device=device, dtype=dtype)
        s = statistics.median(time_samples(lambda: torch.mm(x, w, out=out), device, warmup, iters, inner))
        case.update(ms=s * 1e3, tflops=2 * m * k * n / s / 1e12)

    results = run_cases([{"name": name, "M": m, "K": k, "N": n} for name, m, k, n in shapes], "matmul", measure)

    ok = [c["tflops"] for c in results if "tflops" in c]
    if not ok:
        raise RuntimeError("every matmul shape failed")
    return {
        "dtype": str(dtype).removeprefix("torch."), "op": "torch.mm(A, B, out=C), FLOPs = 2*M*K*N",
        "timing": f"median of {iters} samples of {inner} calls after {warmup} warmup",
        "cases": results,
        "bf16_matmul_tflops": max(ok),
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, few steps: exercises the code paths, numbers are meaningless")
    ap.add_argument("--batch", type=int, default=8, help="trainer per-device batch (sequences of 1024)")
    ap.add_argument("--trainer-steps", type=int, default=None,
                    help="trainer steps in total, warm-up included (default 30; 5 with --dry-run)")
    ap.add_argument("--trainer-warmup", type=int, default=None,
                    help="first trainer steps left out of the timing (default 10; 2 with --dry-run)")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="GPT-2 resid/embd/attn dropout (GPT2Config's default is 0.1; the runtime has none)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        ap.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    a.parts = [p for p in PARTS if p in parts]  # canonical order, no duplicates
    if a.trainer_steps is None:
        a.trainer_steps = 5 if a.dry_run else 30
    if a.trainer_warmup is None:
        a.trainer_warmup = 2 if a.dry_run else 10
    if a.batch < 1:
        ap.error("--batch must be >= 1")
    if a.trainer_warmup < 0 or a.trainer_steps <= a.trainer_warmup:
        ap.error("--trainer-steps must exceed --trainer-warmup (>= 0)")
    if not 0.0 <= a.dropout < 1.0:
        ap.error("--dropout must be in [0, 1)")
    # Internally trainer_steps counts only the timed steps.
    a.trainer_steps -= a.trainer_warmup
    return a


def main(argv=None):
    a = parse_args(argv)

    # Keep stdout for the single JSON object: anything printed by libraries (Trainer's
    # PrinterCallback, C-level messages) is sent to stderr instead.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    if a.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = None

    report = {"script": "scripts/gpu_reference.py", "dry_run": a.dry_run, "parts": a.parts}
    try:
        report["env"] = environment(device or torch.device("cpu"))
    except Exception as e:
        report["env"] = {"error": f"{type(e).__name__}: {e}"}

    runners = {"trainer": part_trainer, "sdpa": part_sdpa, "copy": part_copy, "matmul": part_matmul}
    t_all = time.perf_counter()
    for name in a.parts:
        t0 = time.perf_counter()
        log(f"{name} ...")
        try:
            if device is None:
                raise RuntimeError("CUDA is not available (use --dry-run to check the code paths on CPU)")
            report[name] = runners[name](a, device)
        except Exception as e:
            log(f"{name} failed:\n{traceback.format_exc()}")
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            release_memory()
        report[name]["part_seconds"] = time.perf_counter() - t0
        log(f"{name} done in {report[name]['part_seconds']:.1f} s")
    report["total_seconds"] = time.perf_counter() - t_all

    json_out.write(json.dumps(report, indent=2) + "\n")
    json_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

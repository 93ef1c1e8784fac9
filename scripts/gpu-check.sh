#!/usr/bin/env bash
# The GPU checks and benchmarks, on a machine with an NVIDIA GPU, PyTorch and transformers and no
# Rust toolchain. Takes a release binary built elsewhere (`cargo build --release`, then strip it):
#
#     scripts/gpu-check.sh [BINARY] [OUT_DIR]      (defaults: target/gpu/runtime, gpu-check-out)
#
# `scripts/gpu-prepare.sh` makes both beforehand, on a machine with Rust: the stripped binary
# (target/gpu/runtime, without the mpi feature) and the kernels compiled ahead with the GPU
# machine's NVRTC version (target/gpu/kernel-cache), so the first start loads them instead of
# compiling. With GPU_CHECK_PACK=DIR the summary, the status log and a tarball of the outputs
# also go to DIR (three files).
#
# 1. every op of the CUDA backend against the CPU backend on random inputs, then whole training
#    steps, in f32 and in bf16 (`runtime cuda-check`; each bf16 row beside the CPU model's error
#    for the same check: a row far above it is a kernel's, not bf16's), and where a bf16 row fails,
#    the bf16 checks again with `RUNTIME_CUDA_HOLDS=copies` and `off` (docs/CUDA.md: is a held
#    copy the cause?);
#    then the addition example (GPT-2) and the reverse example (T5) trained on the GPU and the CPU,
#    and NCCL in one process (`ddp_backend = "nccl"`, plain and sharded, f32 and bf16) against
#    the same runs without it (the same model bits) (these run after parts 2, 3 and 6's
#    measurements, so that a run that hangs cannot leave the call without them);
# 2. the attention kernels and the fused AdamW step timed (`runtime cuda-check --bench`);
# 3. GPT-2 124M training throughput (sequence 1024, bf16) with `runtime bench` and with
#    `transformers.Trainer` (`scripts/gpu_reference.py`) on the same GPU, one after the other, and
#    our step again with `RUNTIME_CUDA_HOLDS=copies` (the held products off);
# 4. Llama 8 x 1024 trained whole and with LoRA r 16 (`runtime bench --lora_r 16`);
# 5. a short table: tokens/s, MFU (llm.c's 6N + 12*L*C*T FLOPs per token, against the bf16
#    matmul rate PyTorch reaches on this GPU in the same run), peak memory, attention against
#    PyTorch's flash SDPA, AdamW against the device copy bandwidth;
# 6. the step's roofline account for this GPU (`runtime bench --roofline`, no GPU needed): modeled
#    against measured step time, modeled and measured MFU against the data-sheet rate, per-op table,
#    and per op kind the modeled time against `runtime bench --profile` (each op timed on the GPU,
#    less one idle wait's round trip per timed call);
#    the same modeled against measured for the Llama full and LoRA steps of part 4.
#
# Every part runs even when an earlier one fails; the exit status is non-zero if any did. Each
# part has its own time limit (`timeout -k 10`: a training run takes the first TERM as a request to
# stop), and parts that would start after DEADLINE seconds (360) are skipped and reported, so the
# whole stays under 8 minutes and the summary is always written. A binary that needs a library
# this machine lacks (MPICH, from `--features mpi`) is refused at the start, and the kernels are
# compiled into the cache (`runtime kernels --cache`) before any timed part. On an H200 the whole script
# took about 85 s with the kernels compiled ahead (the PyTorch reference about 30 s of it, the NCCL
# runs about 25 s); compiling them at the first start adds about 40 s.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/gpu/runtime}
OUT=${2:-gpu-check-out}
mkdir -p "$OUT" && : > "$OUT/status.txt"
[ -x "$BIN" ] || { echo "no runtime binary at $BIN" >&2; exit 2; }
# a binary built with `--features mpi` needs MPICH's library, which this machine may not have
if ldd "$BIN" 2>/dev/null | grep -q "not found"; then
    echo "$BIN needs libraries this machine lacks (build it with plain \`cargo build --release\`, no mpi feature):" >&2
    ldd "$BIN" | grep "not found" >&2; exit 2
fi
PY=${PYTHON:-python3}

# cudarc loads libcuda, libnvrtc and libcublasLt at run time: add the CUDA libraries that the
# PyTorch install brings (the nvidia-* wheels) to the search path
NV_LIBS=$($PY - <<'PY' 2>/dev/null
import glob, os, site
dirs = []
for base in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib")))
print(":".join(dict.fromkeys(dirs)))
PY
)
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUNTIME_KERNEL_CACHE_DIR="$OUT/kernel-cache"
# kernels compiled ahead of time beside the binary (`runtime kernels --cache --arch sm_90` with
# RUNTIME_KERNEL_CACHE_DIR=target/gpu/kernel-cache): the first start then loads instead of compiling
# (entries whose NVRTC version or architecture differ are simply not used)
if [ -d "$(dirname "$BIN")/kernel-cache" ]; then
    mkdir -p "$RUNTIME_KERNEL_CACHE_DIR" && cp -r "$(dirname "$BIN")/kernel-cache/." "$RUNTIME_KERNEL_CACHE_DIR/"
fi
status=0
# every part ends within its own limit and the whole within 8 minutes: past DEADLINE seconds the
# parts left are skipped (and reported), so the summary is still written
DEADLINE=${DEADLINE:-360}
# the status log so far into the pack (GPU_CHECK_PACK) after every part: a call cut short still
# brings it back
pack_status() {
    if [ -n "${GPU_CHECK_PACK:-}" ]; then
        mkdir -p "$GPU_CHECK_PACK" && cp "$OUT/status.txt" "$GPU_CHECK_PACK/" 2>/dev/null
    fi
}
run() { # name, command...: runs, keeps stdout in $OUT/name, reports failure
    local name=$1; shift
    local t0=$SECONDS
    if [ "$SECONDS" -ge "$DEADLINE" ]; then
        echo "== $name: SKIPPED (past ${DEADLINE} s)" | tee -a "$OUT/status.txt"; status=1; pack_status; return
    fi
    if "$@" >"$OUT/$name" 2>"$OUT/$name.err"; then
        echo "== $name: ok ($((SECONDS - t0)) s)" | tee -a "$OUT/status.txt"
    else
        echo "== $name: FAILED ($((SECONDS - t0)) s)" | tee -a "$OUT/status.txt"; tail -n 20 "$OUT/$name.err"; status=1
    fi
    pack_status
}

echo "binary: $BIN, built from $(cat "$(dirname "$BIN")/COMMIT" 2>/dev/null || echo 'an unknown commit (no COMMIT beside it: scripts/gpu-prepare.sh writes one)')" \
    | tee -a "$OUT/status.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
# the kernels compiled (or found in the cache) for this GPU before anything times a start-up:
# compiling them all takes about a minute, and a cache made by another NVRTC version is not used
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
run kernel_cache.txt timeout -k 10 150 "$BIN" kernels --cache --arch "sm_${CC:-90}"
run parity_f32.md timeout -k 10 40 "$BIN" cuda-check
run parity_bf16.md timeout -k 10 40 "$BIN" cuda-check --bf16
cat "$OUT/parity_f32.md" "$OUT/parity_bf16.md" | grep -E "FAIL|^[A-Z]" || true
# a failing bf16 row: the same checks with the held products off (`RUNTIME_CUDA_HOLDS=copies`: no
# op reads a held copy in place of f32 values) and with no holds at all, which says whether the
# held copies are the cause (docs/CUDA.md)
if grep -q "| FAIL |" "$OUT/parity_bf16.md" || [ ! -s "$OUT/parity_bf16.md" ]; then
    for h in copies off; do
        run "parity_bf16_holds_$h.md" env RUNTIME_CUDA_HOLDS=$h timeout -k 10 40 "$BIN" cuda-check --bf16
        grep -E "FAIL|^[A-Z]" "$OUT/parity_bf16_holds_$h.md" || true
    done
fi
# the headline measurements before the longer correctness runs: if something hangs, these have run
run kernels.json timeout -k 10 35 "$BIN" cuda-check --bf16 --bench --json
run ours.json timeout -k 10 45 "$BIN" bench --device cuda --bf16 --arch gpt2 --n_layer 12 --hidden 768 --n_head 12 --vocab 50257 \
    --seq 1024 --batch 8 --steps 10 --warmup 3 --json
# the same step with the held products off (each held buffer's f32 values written and read):
# what writing and reading the bf16 copies alone is worth, measured
run ours_holds_copies.json env RUNTIME_CUDA_HOLDS=copies timeout -k 10 45 "$BIN" bench --device cuda --bf16 --arch gpt2 --n_layer 12 --hidden 768 \
    --n_head 12 --vocab 50257 --seq 1024 --batch 8 --steps 10 --warmup 3 --json
run reference.json timeout -k 10 100 $PY scripts/gpu_reference.py
# the same step as modeled by the roofline account (no GPU involved), for this GPU's peak rates
CHIP=$(grep -oiE "h200|h100|a100" "$OUT/gpu.txt" | head -1 | tr 'A-Z' 'a-z')
run roofline.json timeout -k 10 30 "$BIN" bench --device cuda --bf16 --roofline "${CHIP:-h100}" --arch gpt2 --n_layer 12 --hidden 768 --n_head 12 \
    --vocab 50257 --seq 1024 --batch 8 --json
# the same step with every op timed (each waits for the device), for the per-op comparison
run profile.json timeout -k 10 45 "$BIN" bench --device cuda --bf16 --profile --arch gpt2 --n_layer 12 --hidden 768 --n_head 12 --vocab 50257 \
    --seq 1024 --batch 8 --steps 3 --warmup 2 --json
# the trainer end to end on the GPU and on the CPU (same data, seed and steps): the logged losses
# side by side, then the GPU's checkpoint resumed on the CPU
TRAIN=(train --config examples/addition/train.toml --max_steps 200 --logging_steps 50 --eval_steps 100 --save_steps 100 --num_train_epochs 1)
run train_cuda.jsonl timeout -k 10 30 "$BIN" "${TRAIN[@]}" --device cuda --output_dir "$OUT/addition_cuda"
run train_cpu.jsonl timeout -k 10 25 "$BIN" "${TRAIN[@]}" --device cpu --output_dir "$OUT/addition_cpu"
run resume_on_cpu.jsonl timeout -k 10 25 "$BIN" "${TRAIN[@]}" --device cpu --max_steps 250 --output_dir "$OUT/addition_cuda" \
    --overwrite_output_dir false --resume_from_checkpoint "$OUT/addition_cuda/checkpoint-200"
# an encoder-decoder model (the reverse example's T5) on the GPU and on the CPU, evaluated with
# predict_with_generate at the end
S2S=(train --config examples/reverse/train.toml --max_steps 100 --logging_steps 25 --eval_steps 100 --save_steps 100)
run reverse_cuda.jsonl timeout -k 10 40 "$BIN" "${S2S[@]}" --device cuda --output_dir "$OUT/reverse_cuda"
run reverse_cpu.jsonl timeout -k 10 40 "$BIN" "${S2S[@]}" --device cpu --output_dir "$OUT/reverse_cpu"
# deterministic by design: a bf16 job at head dim 64 (the tensor-core attention) run twice gives the
# same bits
cat > "$OUT/det_config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 256,
 "initializer_range": 0.02, "intermediate_size": 512, "max_position_embeddings": 16, "model_type": "llama",
 "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": 0, "rms_norm_eps": 1e-6,
 "rope_theta": 10000.0, "tie_word_embeddings": true, "vocab_size": 16}
JSON
DET=(train --config examples/addition/train.toml --config_name "$OUT/det_config.json" --bf16 true --max_steps 60 --eval_strategy no
     --save_strategy no --load_best_model_at_end false --logging_steps 20 --device cuda)
run det_a.jsonl timeout -k 10 30 "$BIN" "${DET[@]}" --output_dir "$OUT/det_a"
run det_b.jsonl timeout -k 10 30 "$BIN" "${DET[@]}" --output_dir "$OUT/det_b"
if [ ! -s "$OUT/det_a/model.safetensors" ] || [ ! -s "$OUT/det_b/model.safetensors" ]; then
    echo "a bf16 training job on the GPU run twice (60 steps, head dim 64): a run FAILED (no model to compare)" | tee "$OUT/determinism.txt" | tee -a "$OUT/status.txt"; status=1
elif cmp -s "$OUT/det_a/model.safetensors" "$OUT/det_b/model.safetensors"; then
    echo "a bf16 training job on the GPU run twice (60 steps, head dim 64): the same model bits" | tee "$OUT/determinism.txt" | tee -a "$OUT/status.txt"
else
    echo "a bf16 training job on the GPU run twice (60 steps, head dim 64): DIFFERENT model bits" | tee "$OUT/determinism.txt" | tee -a "$OUT/status.txt"; status=1
fi
# NCCL (`ddp_backend = "nccl"`, issue 15) in one process: one GPU hosts one NCCL rank, so this
# covers the communicator, the gradient sums (plain), the sharded optimizer's reduce and
# broadcast (shard_grad_op) and the weights' gathers (full_shard), in f32 and bf16. A sum over
# one process changes nothing, so each run must give the same model bits as the same run
# without NCCL. The `nvidia-nccl` wheel ships libnccl.so.2 only: link it as libnccl.so
NCCL_SO=$(for d in ${NV_LIBS//:/ }; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -1)
if [ -n "$NCCL_SO" ]; then
    mkdir -p "$OUT/lib" && ln -sf "$NCCL_SO" "$OUT/lib/libnccl.so" && export LD_LIBRARY_PATH="$(cd "$OUT/lib" && pwd):$LD_LIBRARY_PATH"
fi
NC=(train --config examples/addition/train.toml --max_steps 40 --eval_strategy no --save_strategy no --load_best_model_at_end false
    --logging_steps 20 --device cuda)
: > "$OUT/nccl.txt"
for mode in plain shard_grad_op full_shard; do
    for bf in false true; do
        F=(--bf16 "$bf"); [ "$mode" != plain ] && F+=(--fsdp "$mode")
        run "nccl_${mode}_${bf}.jsonl" timeout -k 10 30 "$BIN" "${NC[@]}" "${F[@]}" --ddp_backend nccl --output_dir "$OUT/nccl_${mode}_$bf"
        run "host_${mode}_${bf}.jsonl" timeout -k 10 30 "$BIN" "${NC[@]}" "${F[@]}" --output_dir "$OUT/host_${mode}_$bf"
        if cmp -s "$OUT/nccl_${mode}_$bf/model.safetensors" "$OUT/host_${mode}_$bf/model.safetensors"; then
            echo "| $mode | bf16 $bf | the same model bits with and without NCCL |" >> "$OUT/nccl.txt"
        else
            echo "| $mode | bf16 $bf | DIFFERENT model bits (or a failed run) |" >> "$OUT/nccl.txt"; status=1
        fi
    done
done
cat "$OUT/nccl.txt" | tee -a "$OUT/status.txt"
# LoRA against full fine-tuning on the GPU (issue 14): Llama 8 layers x 1024, r 16 on every linear
LLAMA=(bench --device cuda --bf16 --arch llama --n_layer 8 --hidden 1024 --n_head 16 --n_kv_head 8 --vocab 32000 --seq 1024
       --batch 8 --steps 10 --warmup 3 --json)
run llama_full.json timeout -k 10 45 "$BIN" "${LLAMA[@]}"
run llama_lora.json timeout -k 10 45 "$BIN" "${LLAMA[@]}" --lora_r 16
# the same two steps as modeled by the roofline account (no GPU involved), to compare with them
LLAMA_ROOF=(bench --device cuda --bf16 --roofline "${CHIP:-h100}" --arch llama --n_layer 8 --hidden 1024 --n_head 16 --n_kv_head 8 --vocab 32000
            --seq 1024 --batch 8 --json)
run llama_full_roofline.json timeout -k 10 30 "$BIN" "${LLAMA_ROOF[@]}"
run llama_lora_roofline.json timeout -k 10 30 "$BIN" "${LLAMA_ROOF[@]}" --lora_r 16
# the same with the MLP width rounded up to a multiple of 256 (2816, as Llama's own code rounds it;
# the default 1024 * 8 / 3 = 2730 leaves the MLP's operands 4-byte aligned)
run llama_full_2816.json timeout -k 10 45 "$BIN" "${LLAMA[@]}" --intermediate 2816
run llama_lora_2816.json timeout -k 10 45 "$BIN" "${LLAMA[@]}" --intermediate 2816 --lora_r 16

$PY - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:
        return {"error": f"{name}: {e}"}
ours, ref, kern, roof, prof = load("ours.json"), load("reference.json"), load("kernels.json"), load("roofline.json"), load("profile.json")
copies = load("ours_holds_copies.json")
def losses(name):
    try:
        rows = [json.loads(l) for l in open(os.path.join(out, name)) if l.startswith("{")]
        return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}
    except Exception:
        return {}
lc, lp, lr = losses("train_cuda.jsonl"), losses("train_cpu.jsonl"), losses("resume_on_cpu.jsonl")
print("| addition example, step | loss on CUDA (f32) | loss on CPU | resumed on CPU from the CUDA checkpoint |\n|---|---|---|---|")
for step in sorted(set(lc) | set(lp) | set(lr)):
    print(f"| {step} | {lc.get(step, '-')} | {lp.get(step, '-')} | {lr.get(step, '-')} |")
print()
sc, sp = losses("reverse_cuda.jsonl"), losses("reverse_cpu.jsonl")
print("| reverse example (T5), step | loss on CUDA (f32) | loss on CPU |\n|---|---|---|")
for step in sorted(set(sc) | set(sp)):
    print(f"| {step} | {sc.get(step, '-')} | {sp.get(step, '-')} |")
print()
if os.path.exists(os.path.join(out, "determinism.txt")):
    print(open(os.path.join(out, "determinism.txt")).read())
if os.path.exists(os.path.join(out, "nccl.txt")):
    print("| NCCL in one process, addition example, 40 steps | precision | result |\n|---|---|---|")
    print(open(os.path.join(out, "nccl.txt")).read())
gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else "?"
print(f"GPU: {gpu}\n")
peak = (ref.get("matmul") or {}).get("bf16_matmul_tflops")
L, C, T = 12, 768, 1024
def mfu(tps, n):
    if not (peak and tps and n):
        return None
    return (6 * n + 12 * L * C * T) * tps / (peak * 1e12)
tr = ref.get("trainer") or {}
rows = [("runtime (bf16)", ours.get("tokens_per_second"), ours.get("parameters"), (ours.get("peak_rss_mib") or 0) * 2**20),
        ("transformers.Trainer (bf16, sdpa)", tr.get("tokens_per_second"), tr.get("n_params"), tr.get("peak_memory_bytes"))]
print("| GPT-2 124M, batch 8 x 1024 | tokens/s | MFU | memory (GiB) |\n|---|---|---|---|")
for name, tps, n, mem in rows:
    m = mfu(tps, n)
    print(f"| {name} | {tps:,.0f} | {m*100:.1f}% | {mem/2**30:.2f} |" if tps and m is not None and mem else f"| {name} | {tps} | - | {mem} |")
if ours.get("tokens_per_second") and tr.get("tokens_per_second"):
    print(f"\nthroughput ratio runtime / Trainer: {ours['tokens_per_second'] / tr['tokens_per_second']:.2f}x (target 1.3x)"
          + (f"; MFU denominator: PyTorch bf16 matmul {peak:.0f} TFLOP/s" if peak else ""))
print("(runtime's memory is the device memory in use after the steps; the Trainer's is torch.cuda.max_memory_allocated)\n")
if ours.get("step_seconds") and copies.get("step_seconds"):
    print(f"with the held products off (RUNTIME_CUDA_HOLDS=copies): {copies['step_seconds']*1e3:.2f} ms per step against "
          f"{ours['step_seconds']*1e3:.2f} ms ({copies['step_seconds'] / ours['step_seconds']:.3f}x), memory "
          f"{(copies.get('peak_rss_mib') or 0)/1024:.2f} GiB against {(ours.get('peak_rss_mib') or 0)/1024:.2f}\n")
if roof.get("modeled_step_seconds"):
    chip = roof["chip"]
    if ours.get("step_seconds"):
        measured_mfu = roof["model_flops_per_step"] / ours["step_seconds"] / chip["tensor"]
        print(f"roofline ({chip['name']} data-sheet rates): modeled step {roof['modeled_step_seconds']*1e3:.2f} ms, measured "
              f"{ours['step_seconds']*1e3:.2f} ms ({ours['step_seconds'] / roof['modeled_step_seconds']:.2f}x the model); MFU against the "
              f"data-sheet {chip['tensor']/1e12:.0f} TFLOP/s: modeled {roof['modeled_mfu']*100:.1f}%, measured {measured_mfu*100:.1f}%; "
              f"{roof['launches_per_step']} launches, {roof['bytes_per_step']/1e9:.1f} GB per step\n")
    else:
        print(f"roofline ({chip['name']} data-sheet rates): modeled step {roof['modeled_step_seconds']*1e3:.2f} ms, MFU "
              f"{roof['modeled_mfu']*100:.1f}% (no measured step: {ours.get('error', 'the bench failed')})\n")
    print("| op family (modeled) | launches | GB | modeled ms |\n|---|---|---|---|")
    for name, f in sorted(roof["ops"].items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"| {name} | {f['launches']} | {(f['read'] + f['written'])/1e9:.2f} | {f['seconds']*1e3:.3f} |")
    print()
    if prof.get("ops") and prof.get("step_seconds"):
        # each timed call also waited for the device once: its idle round trip comes off
        sync = prof.get("sync_seconds") or 0.0
        calls = dict(prof.get("op_calls_per_step") or [])
        raw = {k: share * prof["step_seconds"] for k, share in prof["ops"]}
        measured = {k: max(t - calls.get(k, 0.0) * sync, 0.0) for k, t in raw.items()}
        print(f"per op kind, measured with every op waiting for the device (step {prof['step_seconds']*1e3:.2f} ms; "
              f"one idle wait {sync*1e6:.1f} us, taken off each timed call) against modeled:\n")
        print("| op kind | calls per step | measured ms (raw) | measured ms | modeled ms | measured / modeled |\n|---|---|---|---|---|---|")
        kinds = set(measured) | {k for k in roof.get("op_kinds", {}) if k != "untimed"}
        for k in sorted(kinds, key=lambda k: -measured.get(k, 0.0)):
            m, r = measured.get(k, 0.0), roof.get("op_kinds", {}).get(k, 0.0)
            row = f"| {k} | {calls.get(k, 0.0):.0f} | {raw.get(k, 0.0)*1e3:.3f} | {m*1e3:.3f} | {r*1e3:.3f} |"
            print(row + (f" {m / r:.2f}x |" if r else " - |"))
        print()
if not roof.get("modeled_step_seconds") and ours.get("tokens_per_second") and ours.get("parameters"):
    # no roofline: the measured MFU against the H100/H200 data-sheet bf16 rate all the same
    print(f"measured MFU against the data-sheet 989 TFLOP/s (H100/H200 SXM; no roofline.json): "
          f"{(6 * ours['parameters'] + 12 * L * C * T) * ours['tokens_per_second'] / 989e12 * 100:.1f}%\n")
for mlp, suffix in (("MLP 2730", ""), ("MLP 2816", "_2816")):
    lf, ll = load(f"llama_full{suffix}.json"), load(f"llama_lora{suffix}.json")
    if lf.get("step_seconds") and ll.get("step_seconds"):
        print(f"| Llama 8 x 1024, {mlp}, vocab 32000, batch 8 x 1024, bf16 | step ms | tokens/s | memory (GiB) |\n|---|---|---|---|")
        for name, r in (("full fine-tuning", lf), ("LoRA r 16, every linear", ll)):
            print(f"| {name} | {r['step_seconds']*1e3:.2f} | {r['tokens_per_second']:,.0f} | {(r.get('peak_rss_mib') or 0)/1024:.2f} |")
        print(f"\nLoRA step / full step: {ll['step_seconds'] / lf['step_seconds']:.2f}x\n")
        if not suffix:
            for name, r, m in (("full", lf, load("llama_full_roofline.json")), ("LoRA r 16", ll, load("llama_lora_roofline.json"))):
                if m.get("modeled_step_seconds"):
                    print(f"roofline, Llama {name}: modeled {m['modeled_step_seconds']*1e3:.2f} ms ({m['launches_per_step']} launches, "
                          f"{m['bytes_per_step']/1e9:.1f} GB), measured {r['step_seconds']*1e3:.2f} ms "
                          f"({r['step_seconds'] / m['modeled_step_seconds']:.2f}x the model)")
            print()
sdpa = {(c["D"], c["T"]): c for c in (ref.get("sdpa") or {}).get("cases", []) if "fwd_bwd_ms" in c}
if isinstance(kern, list):
    print("| attention fwd+bwd | backward | runtime ms | SDPA flash ms | ratio (SDPA / runtime) |\n|---|---|---|---|---|")
    for k in kern:
        if not k["kernel"].startswith("attention fwd+bwd"):
            continue
        form = "atomic dq (for comparison)" if "atomic" in k["kernel"] else "two kernels (default)"
        parts = dict(p.split(" ") for p in k["case"].split(", "))
        s = sdpa.get((int(parts["D"]), int(parts["T"])))
        ratio = f"{s['fwd_bwd_ms'] / k['ms']:.2f}x" if s else "-"
        print(f"| {k['case']} | {form} | {k['ms']:.3f} | {s['fwd_bwd_ms'] if s else '-'} | {ratio} (target 0.8x) |")
    copy = (ref.get("copy") or {}).get("gb_per_s")
    for k in kern:
        if k["kernel"] == "adamw_multi":
            share = f"{k['rate'] / copy * 100:.0f}% of the {copy:.0f} GB/s copy rate" if copy else ""
            print(f"\nfused AdamW ({k['case']}): {k['ms']:.3f} ms, {k['rate']:.0f} GB/s {share} (target 80%)")
else:
    print(f"kernel timings missing: {kern}")
PY
# GPU_CHECK_PACK=DIR: the summary, the status log and a tarball of the outputs (no model files,
# no kernel cache) into DIR, a few files in all (scripts/gpu-prepare.sh)
if [ -n "${GPU_CHECK_PACK:-}" ]; then
    mkdir -p "$GPU_CHECK_PACK"
    cp "$OUT/summary.md" "$OUT/status.txt" "$GPU_CHECK_PACK/" 2>/dev/null
    tar czf "$GPU_CHECK_PACK/gpu-check-out.tgz" --exclude='*.safetensors' --exclude=kernel-cache -C "$(dirname "$OUT")" "$(basename "$OUT")"
fi
exit $status

"""The PyTorch side of the CPU training benchmark: the same model shapes, batch, optimizer and
clipping as `runtime bench`, timed the same way (warm-up steps excluded). Prints one JSON object.

    python scripts/pytorch_train.py --arch gpt2 --steps 5
"""

import argparse
import json
import os
import resource
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def model_for(a):
    if a.arch == "gpt2":
        cfg = GPT2Config(n_layer=a.n_layer, n_embd=a.hidden, n_head=a.n_head, vocab_size=a.vocab, n_positions=max(a.seq, 1024),
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=a.n_layer, hidden_size=a.hidden, num_attention_heads=a.n_head, num_key_value_heads=a.n_head,
                      vocab_size=a.vocab, intermediate_size=a.hidden * 8 // 3, max_position_embeddings=max(a.seq, 1024))
    return LlamaForCausalLM(cfg)


def gemm_gflops(n=2048, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--n_layer", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--n_head", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attn_implementation", default="sdpa")
    ap.add_argument("--lora_r", type=int, default=0, help="train a peft LoRA adapter of this rank on every linear module (alpha 2r)")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    model = model_for(a)
    model.set_attn_implementation(a.attn_implementation)
    if a.lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-4, weight_decay=0.01)
    elapsed = 0.0
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step >= a.warmup:
            elapsed += time.perf_counter() - t0
    step_s = elapsed / a.steps
    print(json.dumps({
        "arch": a.arch, "parameters": sum(p.numel() for p in model.parameters()), "tokens_per_step": a.batch * a.seq,
        "step_seconds": step_s, "tokens_per_second": a.batch * a.seq / step_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "final_loss": loss.item(),
        "machine_gemm_gflops": gemm_gflops(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()

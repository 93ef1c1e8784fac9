"""The transformers side of the decode benchmark: the same model shapes as `runtime bench
--decode`, random prompts, `model.generate` with its KV cache, greedy, exactly `--new_tokens`
tokens (EOS disabled). Prefill is timed as `generate(max_new_tokens=1)`; decode tokens/s counts
the tokens after the first. Prints one JSON object.

    python scripts/pytorch_generate.py --arch llama --batch 8 --new_tokens 64
"""

import argparse
import json
import os
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def model_for(a):
    if a.arch == "gpt2":
        cfg = GPT2Config(n_layer=a.n_layer, n_embd=a.hidden, n_head=a.n_head, vocab_size=a.vocab, n_positions=1024,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=a.n_layer, hidden_size=a.hidden, num_attention_heads=a.n_head, num_key_value_heads=a.n_head,
                      vocab_size=a.vocab, intermediate_size=a.hidden * 8 // 3, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama", choices=["gpt2", "llama"])
    ap.add_argument("--n_layer", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--n_head", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    model = model_for(a).eval()
    ids = torch.randint(0, a.vocab, (a.batch, a.prompt))
    mask = torch.ones_like(ids)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, use_cache=True, eos_token_id=None, pad_token_id=0)

    def timed(n):
        best = float("inf")
        for _ in range(a.reps):
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(max_new_tokens=n, min_new_tokens=n, **kw)
            best = min(best, time.perf_counter() - t)
            assert out.shape[1] == a.prompt + n
        return best

    timed(2)  # warm-up
    prefill = timed(1)
    total = timed(a.new_tokens)
    print(json.dumps({
        "arch": a.arch, "batch": a.batch, "prompt_tokens": a.prompt, "new_tokens": a.new_tokens,
        "prefill_seconds": prefill, "decode_seconds": total - prefill,
        "decode_tokens_per_second": a.batch * (a.new_tokens - 1) / (total - prefill),
        "end_to_end_tokens_per_second": a.batch * a.new_tokens / total,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()

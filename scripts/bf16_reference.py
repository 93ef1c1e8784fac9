"""How far PyTorch's own bf16 autocast moves a training step's gradients from its f32 ones, on the
shapes of `runtime cuda-check`'s training steps (GPT-2 and Llama, 2 layers, width 128, vocab 500,
batch 3 x 64, label smoothing 0.1; plain, and with LoRA or DoRA r 8 on every linear map, the base
frozen; and its encoder-decoder T5 v1.1, 2 + 3 layers, width 64, batch 3 x 20 -> 9). The reference for the bf16 limits of those checks (docs/KERNELS.md): the same two
measures, the largest element's error over the largest gradient and the relative L2 error.

    python scripts/bf16_reference.py            # needs torch, transformers, peft

Runs on the CPU (`torch.autocast("cpu", dtype=torch.bfloat16)`), or on a GPU with --device cuda.
"""
import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration


def model(arch, lora, seed):
    torch.manual_seed(seed)
    if arch == "t5":
        cfg = T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
                       feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=20,
                       tie_word_embeddings=False, decoder_start_token_id=0)
        m = T5ForConditionalGeneration(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=500, n_positions=128)
        m = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=344, vocab_size=500, max_position_embeddings=128)
        m = LlamaForCausalLM(cfg)
    if lora is not None:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(seed + 1)
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, use_dora=lora == "dora"))
    return m.eval()  # no dropout: the two passes see the same network


def grads(m, batch, bf16, device):
    m.zero_grad(set_to_none=True)
    ids, labels, mask = batch
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        if m.config.is_encoder_decoder:
            logits = m(input_ids=ids, attention_mask=mask, decoder_input_ids=m._shift_right(labels)).logits
        else:
            logits = m(input_ids=ids, attention_mask=mask).logits
    if m.config.is_encoder_decoder:
        shift, target = logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    else:
        shift, target = logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift, target, ignore_index=-100, label_smoothing=0.1)
    loss.backward()
    g = torch.cat([p.grad.float().reshape(-1) for p in m.parameters() if p.requires_grad and p.grad is not None])
    return loss.item(), g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    print("| case | loss | gradients, largest element | gradients (L2) |\n|---|---:|---:|---:|")
    for arch, lora in [("gpt2", None), ("llama", None), ("llama", "lora"), ("gpt2", "dora"), ("t5", None)]:
        for seed in range(a.seeds):
            m = model(arch, lora, seed).to(a.device)
            gen = torch.Generator().manual_seed(100 + seed)
            if arch == "t5":
                # sources of 20, 13 and 4 tokens (padded), 9 labels with 4 ignored in the second row
                ids = torch.randint(3, 300, (3, 20), generator=gen)
                mask = torch.ones_like(ids)
                mask[1, 13:] = 0
                mask[2, 4:] = 0
                ids[mask == 0] = 0
                labels = torch.randint(3, 300, (3, 9), generator=gen)
                labels[1, 5:] = -100
            else:
                ids = torch.randint(0, 500, (3, 64), generator=gen)
                labels = ids.clone()
                labels.view(-1)[:7] = -100
                mask = torch.ones_like(ids)
                mask[1, :4] = 0
            batch = tuple(t.to(a.device) for t in (ids, labels, mask))
            l32, g32 = grads(m, batch, False, a.device)
            l16, g16 = grads(m, batch, True, a.device)
            mx = ((g16 - g32).abs().max() / g32.abs().max()).item()
            l2 = ((g16 - g32).norm() / g32.norm()).item()
            name = arch + (f", {lora.upper() if lora == 'dora' else 'LoRA'} r 8" if lora else "") + f", seed {seed}"
            print(f"| {name} | {abs(l16 - l32) / abs(l32):.2e} | {mx:.2e} | {l2:.2e} |")


if __name__ == "__main__":
    main()

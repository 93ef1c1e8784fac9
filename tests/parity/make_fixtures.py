"""Builds the parity fixtures that the Rust tests compare against.

For each architecture it makes a tiny random model with transformers + torch, runs a fixed batch
(right padding, -100 labels inside and at the padding), and stores under tests/fixtures/<case>/:

  model/                  the model as transformers saves it (GPT-2 in bf16, Llama sharded in f32,
                          Qwen2 in f16, so every loader path is covered)
  reference.safetensors   input_ids, attention_mask, labels, logits, loss, grad.<hf name>,
                          loss_smoothed + dlogits_smoothed (label smoothing 0.1, HF's formula),
                          after3.<name> / exp_avg.<name> / exp_avg_sq.<name> (3 AdamW steps),
                          grad_norm (before clipping, one per step)
  reference.json          the optimizer settings and which parameters get weight decay

Re-run from the repository root with a Python that has torch and transformers:

    python tests/parity/make_fixtures.py
"""

import copy
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = Path(__file__).resolve().parent.parent / "fixtures"

LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM, STEPS, SMOOTHING = 1e-2, (0.9, 0.999), 1e-8, 0.1, 0.5, 3, 0.1


def cases():
    yield "gpt2", GPT2LMHeadModel(GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    )), torch.bfloat16, None
    yield "llama", LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )), torch.float32, "40KB"
    yield "qwen2", Qwen2ForCausalLM(Qwen2Config(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )), torch.float16, None


def no_decay(name):
    # transformers.Trainer.get_decay_parameter_names: biases and normalisation weights are not decayed.
    return "bias" in name or re.search(r"(ln_|norm)", name) is not None


def batch(vocab):
    g = torch.Generator().manual_seed(1)
    B, T = 3, 12
    lengths = [12, 9, 6]
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :4] = -100  # a "prompt" whose tokens carry no loss
    labels[1, 5] = -100
    return ids, mask, labels


def make(name, model, store_dtype, shard):
    torch.manual_seed(0)
    with torch.no_grad():  # spread every parameter so biases and norm weights matter
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if re.search(r"(ln_|norm)", pname) and "bias" not in pname else 0.0) + 0.1 * torch.randn_like(p))
        for p in model.parameters():  # the stored dtype's rounding is part of the reference weights
            p.copy_(p.to(store_dtype).float())
    model.config.attn_implementation = "eager"
    model.train()
    d = OUT / name
    (d / "model").mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": shard} if shard else {}
    # save a copy: casting the model itself would also round buffers such as RoPE's inv_freq
    copy.deepcopy(model).to(store_dtype).save_pretrained(d / "model", **kw)
    model.set_attn_implementation("eager") if hasattr(model, "set_attn_implementation") else None

    ids, mask, labels = batch(model.config.vocab_size)
    ref = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref["logits"] = out.logits.detach()
    ref["loss"] = out.loss.detach().reshape(1)
    sd_names = set(model.state_dict().keys())
    for pname, p in model.named_parameters():
        ref[f"grad.{pname}"] = p.grad.detach().clone()

    # label smoothing on the same logits: HF's LabelSmoother equals torch's label_smoothing
    logits = out.logits.detach().clone().requires_grad_(True)
    ls = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=-100, label_smoothing=SMOOTHING)
    ls.backward()
    ref["loss_smoothed"] = ls.detach().reshape(1)
    ref["dlogits_smoothed"] = logits.grad.detach()

    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    norms = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        opt.step()
    ref["grad_norm"] = torch.tensor(norms)
    for pname, p in named:
        st = opt.state[p]
        ref[f"after3.{pname}"] = p.detach().clone()
        ref[f"exp_avg.{pname}"] = st["exp_avg"].clone()
        ref[f"exp_avg_sq.{pname}"] = st["exp_avg_sq"].clone()
    save_file({k: v.contiguous() for k, v in ref.items()}, d / "reference.safetensors")
    meta = {
        "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM, "steps": STEPS, "label_smoothing": SMOOTHING,
        "no_decay": [n for n, _ in named if no_decay(n)],
        "parameters": [n for n, _ in named],
        "state_dict_keys": sorted(sd_names),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    (d / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: loss {out.loss.item():.6f}, {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    for name, model, dtype, shard in cases():
        make(name, model, dtype, shard)

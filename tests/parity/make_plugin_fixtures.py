"""Reference gradients for the loss plugins: focal loss, per-example weighted cross-entropy and
cross-entropy plus z-loss, computed with PyTorch autograd on the Llama parity model and batch
(tests/fixtures/llama, made by make_fixtures.py). Writes tests/fixtures/plugins/reference.safetensors.

    python tests/parity/make_plugin_fixtures.py
"""
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

FIX = Path(__file__).resolve().parent.parent / "fixtures"
GAMMA = 2.0
ALPHA = 1e-2
WEIGHTS = [1.0, 0.5, 2.0]


def token_logprobs(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    return lp, lse, mask


def losses(lp, lse, mask):
    n = mask.sum()
    p = lp.exp()
    focal = (-(1 - p).pow(GAMMA) * lp)[mask].sum() / n
    w = torch.tensor(WEIGHTS).unsqueeze(1).expand_as(lp)
    weighted = (-w * lp)[mask].sum() / n
    z = (-lp + ALPHA * lse * lse)[mask].sum() / n
    return {"focal": focal, "weighted": weighted, "zloss": z}


def main():
    ref = load_file(FIX / "llama" / "reference.safetensors")
    batch = {k: ref[k] for k in ("input_ids", "attention_mask", "labels")}
    model = AutoModelForCausalLM.from_pretrained(FIX / "llama" / "model", dtype=torch.float32, attn_implementation="eager")
    model.train()
    out = {}
    for name in ("focal", "weighted", "zloss"):
        model.zero_grad()
        loss = losses(*token_logprobs(model, batch))[name]
        loss.backward()
        out[f"{name}.loss"] = loss.detach().reshape(1)
        for pname, p in model.named_parameters():
            out[f"{name}.grad.{pname}"] = p.grad.detach().clone()
        print(f"{name}: loss {loss.item():.6f}")
    d = FIX / "plugins"
    d.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, d / "reference.safetensors")
    meta = {"gamma": GAMMA, "alpha": ALPHA, "weights": WEIGHTS, "torch": torch.__version__, "transformers": transformers.__version__}
    (d / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()

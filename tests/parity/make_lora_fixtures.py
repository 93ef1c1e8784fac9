"""LoRA parity fixtures made with peft, for tests/lora.rs.

Each case wraps one of the tiny base models of tests/fixtures/<arch>/model (made by
make_fixtures.py) with `get_peft_model` and a `LoraConfig`, gives every `lora_A` and `lora_B` a
non-zero random value (with the default init, B is zero and the adapter would change nothing), and
runs the batch of tests/fixtures/<arch>/reference.safetensors. Under tests/fixtures/lora/<case>/:

  adapter/                  the adapter as `save_pretrained` writes it (adapter_config.json,
                            adapter_model.safetensors)
  reference.safetensors     logits, loss, and grad.<key> for every trainable tensor, under the
                            key `adapter_model.safetensors` gives it
  merged.safetensors        the base with the adapter merged in (`merge_and_unload`), under
                            transformers' names

Re-run from the repository root with a Python that has torch, transformers and peft:

    python tests/parity/make_lora_fixtures.py
"""

import json
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
OUT = FIXTURES / "lora"

CASES = {
    # GQA Llama, every linear adapted, the untied head trained whole
    "llama_all_linear": ("llama", dict(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"])),
    # GPT-2's Conv1D modules (c_attn fused by transformers itself; c_proj names two modules), rsLoRA
    "gpt2_rslora": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], use_rslora=True)),
    # Qwen2 (tied, biased q/k/v): a regex target, a per-module rank, every bias trained
    "qwen2_regex": ("qwen2", dict(r=4, lora_alpha=16, target_modules=r".*\.(q_proj|k_proj|down_proj)", bias="all",
                                   rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 8})),
    # DoRA: parts of the engine's fused maps (q and v of q/k/v, gate of gate/up) and a whole one
    "llama_dora": ("llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], use_dora=True)),
    # DoRA on Conv1D (fan_in_fan_out) with every bias trained
    "gpt2_dora": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "c_proj"], use_dora=True, bias="all")),
    # DoRA with rsLoRA over frozen biased q/k
    "qwen2_dora_rslora": ("qwen2", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"], use_dora=True, use_rslora=True)),
}


def saved_key(name):
    # the parameter's name as get_peft_model_state_dict saves it (adapter name stripped)
    name = name.replace(".modules_to_save.default", "").replace(".default", "")
    # DoRA's magnitude is saved without its `.weight`
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


if __name__ == "__main__":
    torch.manual_seed(0)
    for case, (arch, kwargs) in CASES.items():
        base = AutoModelForCausalLM.from_pretrained(FIXTURES / arch / "model", dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **kwargs))
        g = torch.Generator().manual_seed(len(case))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                if "lora_magnitude_vector" in name:
                    # away from the weight norm it starts at, so that m / ||W + s B A|| is not 1
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
        ref_in = load_file(FIXTURES / arch / "reference.safetensors")
        ids, mask, labels = ref_in["input_ids"], ref_in["attention_mask"], ref_in["labels"]
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        ref = {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits": out.logits.detach(), "loss": out.loss.detach().reshape(1)}
        trained = 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                ref[f"grad.{saved_key(name)}"] = p.grad.detach().clone()
                trained += p.numel()
        d = OUT / case
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d / "adapter")
        # the fixture names its base relative to the repository, and carries no model card
        (d / "adapter" / "README.md").unlink()
        cfg_path = d / "adapter" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = f"tests/fixtures/{arch}/model"
        if isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        # the saved keys must be the ones the gradients are stored under
        saved = set(load_file(d / "adapter" / "adapter_model.safetensors"))
        grads = {k[len("grad."):] for k in ref if k.startswith("grad.")}
        assert saved == grads, (sorted(saved ^ grads))
        save_file({k: v.contiguous() for k, v in ref.items()}, d / "reference.safetensors")
        merged = model.merge_and_unload()
        save_file({k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}, d / "merged.safetensors")
        print(f"{case}: loss {out.loss.item():.6f}, {trained} trainable values, peft {peft.__version__}, transformers {transformers.__version__}")

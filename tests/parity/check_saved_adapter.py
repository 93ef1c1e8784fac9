"""Checks that adapters `runtime` trains load in peft and give the runtime's logits, and that
`runtime merge` loads in transformers.

1. `runtime train` trains a LoRA adapter (all-linear, with the head in `modules_to_save` where the
   head is untied, rsLoRA on GPT-2; DoRA on Llama and GPT-2) on each parity fixture's base for a
   few steps;
2. `PeftModel.from_pretrained(base, output)` loads it (every saved key must be used) and its
   logits on the fixture batch are compared with `runtime forward --adapter output`;
3. `runtime merge` folds it into the base; `AutoModelForCausalLM` loads the result and gives the
   same logits.

Run from the repository root after `cargo build --release`, with a Python that has torch,
transformers and peft:

    python tests/parity/check_saved_adapter.py [--runtime target/release/runtime]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CASES = {
    "llama": ("llama", {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "modules_to_save": ["lm_head"]}),
    "gpt2": ("gpt2", {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"], "use_rslora": True}),
    "qwen2": ("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-dora": ("llama", {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_dora": True}),
    "gpt2-dora": ("gpt2", {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"], "use_dora": True, "bias": "all"}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default=str(ROOT / "target" / "release" / "runtime"))
    rt = ap.parse_args().runtime
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the addition example's character tokenizer fits the fixtures' 96-token vocabularies
        data = ROOT / "examples" / "addition" / "validation.jsonl"
        for case, (arch, peft_cfg) in CASES.items():
            base = FIXTURES / arch / "model"
            out = tmp / case
            subprocess.run([rt, "train", "--model_name_or_path", str(base), "--tokenizer_name", str(ROOT / "examples" / "addition"),
                            "--train_file", str(data), "--max_steps", "5", "--learning_rate", "1e-2",
                            "--per_device_train_batch_size", "4", "--save_strategy", "no", "--disable_tqdm", "true",
                            "--output_dir", str(out), "--peft", json.dumps(peft_cfg)], check=True, capture_output=True)
            batch = load_file(FIXTURES / arch / "reference.safetensors")
            inputs = {k: batch[k] for k in ["input_ids", "attention_mask"]}
            save_file({k: v.contiguous() for k, v in inputs.items()}, tmp / "batch.safetensors")
            subprocess.run([rt, "forward", "--model", str(base), "--adapter", str(out), "--inputs", str(tmp / "batch.safetensors"),
                            "--output", str(tmp / "ours.safetensors"), "--device", "cpu"], check=True, capture_output=True)
            ours = load_file(tmp / "ours.safetensors")["logits"]
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
            saved = set(load_file(out / "adapter_model.safetensors"))
            used = {n.replace(".default", "").replace(".modules_to_save", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                    for n, _ in model.named_parameters()}
            assert saved <= used, f"{case}: keys peft did not use: {sorted(saved - used)}"
            with torch.no_grad():
                theirs = model(**inputs).logits
            err = ((ours - theirs).norm() / theirs.norm()).item()
            subprocess.run([rt, "merge", "--model", str(base), "--adapter", str(out), "--output_dir", str(tmp / f"{case}-merged"),
                            "--torch_dtype", "float32"], check=True, capture_output=True)
            merged = AutoModelForCausalLM.from_pretrained(tmp / f"{case}-merged", dtype=torch.float32)
            with torch.no_grad():
                merr = ((merged(**inputs).logits - theirs).norm() / theirs.norm()).item()
            print(f"{case}: peft's logits vs runtime forward --adapter {err:.2e}; merged model vs peft {merr:.2e}")
            worst = max(worst, err, merr)
    print(f"worst relative error {worst:.2e}")
    sys.exit(0 if worst < 1e-5 else 1)


if __name__ == "__main__":
    main()

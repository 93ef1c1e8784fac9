"""Checks that folders written by `runtime` load in transformers and give the same logits.

For each parity fixture it
  1. re-saves the fixture model with `runtime convert` (sharded, and again in bfloat16), loads the
     result with `AutoModelForCausalLM.from_pretrained(..., output_loading_info=True)`, requires no
     missing, unexpected or mismatched keys and no loading warnings, and compares transformers'
     logits with the fixture's reference logits;
  2. writes a fresh model with `runtime init` (also for a Mistral config), loads it in transformers
     the same way, and compares transformers' logits with `runtime forward`'s on the fixture batch;
  3. trains a few steps with `runtime train` and loads the output folder (model and tokenizer) in
     transformers, comparing logits with `runtime forward`'s.

Run from the repository root after `cargo build --release`, with a Python that has torch and
transformers:

    python tests/parity/check_saved.py [--runtime target/release/runtime]
"""

import argparse
import io
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def load_checked(folder, dtype=torch.float32):
    """from_pretrained, failing on any missing/unexpected/mismatched key or loading warning."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    tlog = transformers.utils.logging.get_logger("transformers")
    tlog.addHandler(handler)
    transformers.utils.logging.set_verbosity_warning()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True, attn_implementation="eager")
    finally:
        tlog.removeHandler(handler)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{folder}: loading info {problems}"
    warnings = [l for l in stream.getvalue().splitlines() if any(w in l for w in ("not used", "not initialized", "newly initialized", "missing", "unexpected", "mismatch"))]
    assert not warnings, f"{folder}: loading warnings {warnings}"
    return model.eval()


def logits_of(model, ref):
    with torch.no_grad():
        return model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits.float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def run(binary, *args):
    out = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"runtime {' '.join(map(str, args))} failed:\n{out.stderr}")
    return out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default=str(ROOT / "target" / "release" / "runtime"))
    args = ap.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in ["gpt2", "llama", "qwen2"]:
            ref = load_file(FIXTURES / case / "reference.safetensors")
            mask = ref["attention_mask"].bool()

            out = tmp / f"{case}-sharded"
            run(args.runtime, "convert", "--model", FIXTURES / case / "model", "--output_dir", out, "--torch_dtype", "float32", "--max_shard_size", "30KB")
            shards = sorted(p.name for p in out.glob("model-*.safetensors"))
            model = load_checked(out)
            err = rel(logits_of(model, ref)[mask], ref["logits"][mask])
            print(f"{case}: runtime convert (f32, {len(shards)} shards) -> transformers logits vs reference: rel err {err:.2e}")
            failures += err > 1e-5

            out = tmp / f"{case}-bf16"
            run(args.runtime, "convert", "--model", FIXTURES / case / "model", "--output_dir", out, "--torch_dtype", "bfloat16")
            assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
            model = load_checked(out, dtype=torch.bfloat16)
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
            print(f"{case}: runtime convert (bf16) loads in transformers as bfloat16 with no warnings")

            config = tmp / f"{case}-config.json"
            config.write_text((FIXTURES / case / "model" / "config.json").read_text())
            out = tmp / f"{case}-init"
            run(args.runtime, "init", "--config", config, "--output_dir", out, "--seed", "5")
            model = load_checked(out)
            theirs = logits_of(model, ref)
            run(args.runtime, "forward", "--model", out, "--inputs", FIXTURES / case / "reference.safetensors", "--output", tmp / "out.safetensors", "--attn_implementation", "eager")
            ours = load_file(tmp / "out.safetensors")["logits"]
            err = rel(ours[mask], theirs[mask])
            print(f"{case}: runtime init -> transformers logits vs runtime forward: rel err {err:.2e}")
            failures += err > 1e-5
        # a Mistral config (Llama with grouped-query attention and a sliding window) through init
        case = "mistral"
        ref = load_file(FIXTURES / "llama" / "reference.safetensors")
        mask = ref["attention_mask"].bool()
        config = tmp / "mistral-config.json"
        config.write_text(json.dumps(transformers.MistralConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=32, rope_theta=5000.0).to_dict()))
        out = tmp / "mistral-init"
        run(args.runtime, "init", "--config", config, "--output_dir", out, "--seed", "9")
        model = load_checked(out)
        theirs = logits_of(model, ref)
        run(args.runtime, "forward", "--model", out, "--inputs", FIXTURES / "llama" / "reference.safetensors", "--output", tmp / "out.safetensors")
        ours = load_file(tmp / "out.safetensors")["logits"]
        err = rel(ours[mask], theirs[mask])
        print(f"{case}: runtime init -> transformers logits vs runtime forward: rel err {err:.2e}")
        failures += err > 1e-5
        # a folder written by `runtime train`: model, tokenizer and all, loads in transformers
        fx = FIXTURES / "trainer"
        out = tmp / "trained"
        run(args.runtime, "train", "--model_name_or_path", fx / "init", "--train_file", fx / "data" / "train.jsonl",
            "--validation_file", fx / "data" / "validation.jsonl", "--output_dir", out, "--max_steps", "6",
            "--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "3", "--disable_tqdm")
        model = load_checked(out)
        tok = transformers.AutoTokenizer.from_pretrained(out)
        enc = tok(["12+30=42", "7+8=15"], return_tensors="pt", padding=True)
        with torch.no_grad():
            theirs = model(**enc).logits
        inputs = tmp / "trained-inputs.safetensors"
        from safetensors.torch import save_file
        save_file({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, inputs)
        run(args.runtime, "forward", "--model", out, "--inputs", inputs, "--output", tmp / "out.safetensors")
        ours = load_file(tmp / "out.safetensors")["logits"]
        m = enc["attention_mask"].bool()
        err = rel(ours[m], theirs[m])
        print(f"runtime train output -> transformers model + tokenizer, logits vs runtime forward: rel err {err:.2e}")
        failures += err > 1e-5
    if failures:
        sys.exit(f"{failures} comparison(s) above 1e-5")
    print("all folders written by runtime load in transformers and give the same logits")


if __name__ == "__main__":
    main()

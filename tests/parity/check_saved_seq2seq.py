"""Checks that encoder-decoder folders written by `runtime` load with transformers'
`AutoModelForSeq2SeqLM` and give the same logits.

For each encoder-decoder parity fixture (T5 v1.1, T5 v1.0, BART) it
  1. re-saves the fixture model with `runtime convert` (f32 in one file, and bfloat16 in shards),
     loads the result with `from_pretrained(..., output_loading_info=True)`, requires no missing,
     unexpected or mismatched keys, and compares transformers' logits on the fixture batch with the
     fixture's reference logits (bf16: with the reference model rounded the same way);
  2. writes a fresh model from the fixture's config with `runtime init`, loads it the same way and
     compares transformers' logits with `runtime forward`'s.
Then it trains the BART trainer fixture for a few steps with `runtime train` and loads the output
folder (model and tokenizer), comparing logits with `runtime forward`'s.

Run from the repository root after `cargo build --release`, with a Python that has torch and
transformers:

    python tests/parity/check_saved_seq2seq.py [--runtime target/release/runtime]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def load(path, dtype=torch.float32):
    model, info = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"} | ({"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    assert not bad, f"{path}: {bad}"
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"]).logits.float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default="target/release/runtime")
    rt = ap.parse_args().runtime
    run = lambda *a: subprocess.run([rt, *map(str, a)], check=True, capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in ["t5", "t5_v1_0", "bart"]:
            ref = load_file(FIXTURES / case / "reference.safetensors")
            batch = {k: ref[k] for k in ["input_ids", "attention_mask", "decoder_input_ids"]}
            f32, bf16 = tmp / f"{case}_f32", tmp / f"{case}_bf16"
            run("convert", "--model", FIXTURES / case / "model", "--output_dir", f32)
            run("convert", "--model", FIXTURES / case / "model", "--output_dir", bf16, "--torch_dtype", "bfloat16", "--max_shard_size", "40000")
            e = rel(logits(load(f32), batch), ref["logits"])
            assert e < 1e-5, (case, e)
            assert (bf16 / "model.safetensors.index.json").is_file()
            want = logits(load(FIXTURES / case / "model", torch.bfloat16).float(), batch)
            e16 = rel(logits(load(bf16, torch.bfloat16).float(), batch), want)
            assert e16 < 1e-5, (case, e16)
            # a fresh model from the config
            fresh = tmp / f"{case}_init"
            run("init", "--config", FIXTURES / case / "model" / "config.json", "--output_dir", fresh, "--seed", "3")
            inputs, out = tmp / f"{case}_in.safetensors", tmp / f"{case}_out.safetensors"
            save_file({k: v.to(torch.int64).contiguous() for k, v in batch.items()}, inputs)
            run("forward", "--model", fresh, "--inputs", inputs, "--output", out)
            ei = rel(logits(load(fresh), batch), load_file(out)["logits"])
            assert ei < 1e-5, (case, ei)
            print(f"{case}: convert f32 {e:.1e}, bf16 shards {e16:.1e}, init {ei:.1e}")
        # a BART trained by the runtime: model and tokenizer load
        d = FIXTURES / "seq2seq_trainer"
        trained = tmp / "bart_trained"
        run("train", "--model_name_or_path", d / "init_bart", "--train_file", d / "data" / "train.jsonl", "--output_dir", trained,
            "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--disable_tqdm", "true")
        tok = AutoTokenizer.from_pretrained(trained)
        enc = tok(["4072", "19"], padding=True, return_tensors="pt")
        dec = tok(text_target=["2704", "91"], padding=True, return_tensors="pt")["input_ids"]
        model = load(trained)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(dec)}
        inputs, out = tmp / "trained_in.safetensors", tmp / "trained_out.safetensors"
        save_file({k: v.to(torch.int64).contiguous() for k, v in batch.items()}, inputs)
        run("forward", "--model", trained, "--inputs", inputs, "--output", out)
        et = rel(logits(model, batch), load_file(out)["logits"])
        assert et < 1e-5, et
        print(f"bart trained by runtime train: {et:.1e}")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())

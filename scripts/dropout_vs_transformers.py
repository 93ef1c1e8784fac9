"""Training with dropout, side by side: a small GPT-2 (embd_pdrop, resid_pdrop and attn_pdrop 0.1)
trained by `runtime train` (on the CPU) and by `transformers.Trainer` (eager attention)
from the same initial weights on the addition example, with and without dropout. The masks
cannot be the same (different generators), so the runs are compared by their final evaluation
loss. Prints a markdown table.

    cargo build --release
    python scripts/dropout_vs_transformers.py [--steps 300]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, GPT2LMHeadModel, Trainer, TrainingArguments

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples" / "addition"
sys.path.insert(0, str(ROOT / "tests" / "parity"))
from make_trainer_fixtures import Examples  # noqa: E402  (prompt/completion records as the Trainer fixtures tokenize them)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default=str(ROOT / "target" / "release" / "runtime"))
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(EX)
    args = dict(learning_rate=3e-3, per_device_train_batch_size=32, per_device_eval_batch_size=64, max_steps=a.steps, warmup_steps=0.05,
                lr_scheduler_type="cosine", weight_decay=0.01, seed=0, save_strategy="no", eval_strategy="no", logging_steps=50)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for p in [0.1, 0.0]:
            cfg = {"model_type": "gpt2", "vocab_size": len(tok), "n_positions": 32, "n_embd": 64, "n_layer": 2, "n_head": 4,
                   "embd_pdrop": p, "resid_pdrop": p, "attn_pdrop": p, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}
            (tmp / "config.json").write_text(json.dumps(cfg))
            init = tmp / f"init-{p}"
            subprocess.run([a.runtime, "init", "--config", str(tmp / "config.json"), "--output_dir", str(init), "--seed", "0"], check=True, capture_output=True)
            tok.save_pretrained(init)
            out = tmp / f"runtime-{p}"
            flags = [x for k, v in args.items() for x in (f"--{k}", str(v))]
            subprocess.run([a.runtime, "train", "--model_name_or_path", str(init), "--train_file", str(EX / "train.jsonl"),
                            "--validation_file", str(EX / "validation.jsonl"), "--output_dir", str(out), "--disable_tqdm", "true", *flags],
                           check=True, capture_output=True)
            ours = json.loads(subprocess.run([a.runtime, "eval", "--model_name_or_path", str(out), "--validation_file", str(EX / "validation.jsonl"),
                                              "--output_dir", str(tmp / "e")], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            model = GPT2LMHeadModel.from_pretrained(init, dtype=torch.float32, attn_implementation="eager")
            trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp / f"hf-{p}"), report_to="none", **args),
                              train_dataset=Examples(EX / "train.jsonl", tok), eval_dataset=Examples(EX / "validation.jsonl", tok),
                              data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
            trainer.train()
            theirs = trainer.evaluate()
            rows.append((p, ours["eval_loss"], theirs["eval_loss"]))
    print(f"GPT-2 2 x 64 on the addition example, {a.steps} steps of 32 examples, lr 3e-3 cosine\n")
    print("| embd_pdrop = resid_pdrop = attn_pdrop | runtime eval_loss | transformers eval_loss |")
    print("| --- | --- | --- |")
    for p, o, t in rows:
        print(f"| {p} | {o:.4f} | {t:.4f} |")


if __name__ == "__main__":
    main()

"""Runs `transformers.Trainer` on the generated addition data from a small Llama, for the Rust test
`tests/trainer_parity.rs`, which runs `runtime train` with the same arguments and compares the
logged losses, gradient norms, learning rates and evaluation losses step by step, and the final
weights. Writes tests/fixtures/trainer/ (data, tokenizer, initial model, references).

Needs the release binary (for `runtime example addition`) and a Python with torch + transformers:

    cargo build --release && python tests/parity/make_trainer_fixtures.py
"""

import json
import shutil
import subprocess
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "tests" / "fixtures" / "trainer"

COMMON = dict(
    learning_rate=5e-3, warmup_steps=2, lr_scheduler_type="cosine", weight_decay=0.1, max_grad_norm=0.5,
    per_device_train_batch_size=4, per_device_eval_batch_size=8, logging_steps=1, eval_strategy="steps", eval_steps=5,
    train_sampling_strategy="sequential", optim="adamw_torch", seed=0, save_strategy="no", report_to="none",
)
CASES = {
    "accumulation": dict(gradient_accumulation_steps=2, max_steps=10),
    "label_smoothing": dict(gradient_accumulation_steps=1, max_steps=8, label_smoothing_factor=0.1),
}


EVENTS = ["on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin", "on_substep_end",
          "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_evaluate", "on_save", "on_log", "on_prediction_step"]


class Examples(torch.utils.data.Dataset):
    def __init__(self, path, tok):
        self.items = []
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            p = tok(r["prompt"])["input_ids"]
            c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            self.items.append({"input_ids": p + c, "labels": [-100] * len(p) + c})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    data = OUT / "data"
    subprocess.run([str(ROOT / "target" / "release" / "runtime"), "example", "addition", "--output_dir", str(data),
                    "--n_train", "48", "--n_eval", "16", "--digits", "2", "--seed", "3"], check=True, capture_output=True)
    for f in ["config.json", "train.toml", "generation_config.json"]:
        (data / f).unlink()
    tok = AutoTokenizer.from_pretrained(data)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    init = OUT / "init"
    model.save_pretrained(init)
    tok.save_pretrained(init)
    train, evals = Examples(data / "train.jsonl", tok), Examples(data / "validation.jsonl", tok)
    refs = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
    for name, extra in CASES.items():
        m = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32, attn_implementation="eager")
        args = TrainingArguments(output_dir=str(OUT / "tmp" / name), **COMMON, **extra)
        trainer = Trainer(model=m, args=args, train_dataset=train, eval_dataset=evals,
                          data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
        trainer.train()
        save_file({k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}, OUT / f"final_{name}.safetensors")
        refs["cases"][name] = {"args": {**COMMON, **extra}, "log_history": trainer.state.log_history}
    # the order of callback events (with the step each sees) over a run that logs, evaluates,
    # saves, accumulates and crosses an epoch boundary
    events = []

    class Recorder(TrainerCallback):
        pass

    for ev in EVENTS:
        setattr(Recorder, ev, lambda self, args, state, control, _ev=ev, **kw: events.append([_ev, state.global_step]))
    m = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32)
    ev_args = {**COMMON, "save_strategy": "steps", "save_steps": 4, "eval_steps": 2, "logging_steps": 2, "gradient_accumulation_steps": 2, "max_steps": 7}
    args = TrainingArguments(output_dir=str(OUT / "tmp" / "events"), **ev_args)
    Trainer(model=m, args=args, train_dataset=train, eval_dataset=evals, callbacks=[Recorder()],
            data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)).train()
    refs["events"] = {"args": ev_args, "events": events}
    shutil.rmtree(OUT / "tmp")
    (OUT / "reference.json").write_text(json.dumps(refs, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()

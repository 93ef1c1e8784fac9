"""`transformers.Trainer` training a peft LoRA adapter, for the Rust test in tests/lora.rs that
runs `runtime train` with the same adapter and arguments and compares the run step by step.

Starts from the Llama and the addition data of tests/fixtures/trainer/ (made by
make_trainer_fixtures.py): LoRA r 4, lora_alpha 8 on every linear module, the adapter as peft
initialises it (kaiming-uniform A, zero B; saved, since the runtime draws its own random numbers),
then 12 steps with accumulation, warm-up + cosine, weight decay and clipping. Writes
tests/fixtures/trainer/lora/: init_adapter/, final_adapter.safetensors, reference.json.

    python tests/parity/make_lora_trainer_fixtures.py
"""

import json
import shutil
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, LlamaForCausalLM, Trainer, TrainingArguments

from make_trainer_fixtures import COMMON, Examples

ROOT = Path(__file__).resolve().parent.parent.parent
BASE = ROOT / "tests" / "fixtures" / "trainer"
OUT = BASE / "lora"
ARGS = dict(COMMON, gradient_accumulation_steps=2, max_steps=12)
PEFT = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    tok = AutoTokenizer.from_pretrained(BASE / "init")
    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(BASE / "init", dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **PEFT))
    init = OUT / "init_adapter"
    model.save_pretrained(init)
    (init / "README.md").unlink()
    cfg = json.loads((init / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tests/fixtures/trainer/init"
    (init / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    train = Examples(BASE / "data" / "train.jsonl", tok)
    evals = Examples(BASE / "data" / "validation.jsonl", tok)
    args = TrainingArguments(output_dir=str(OUT / "tmp"), **ARGS)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                      data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    trainer.train()
    final = get_peft_model_state_dict(model)
    save_file({k: v.contiguous() for k, v in final.items()}, OUT / "final_adapter.safetensors")
    shutil.rmtree(OUT / "tmp")
    refs = {"transformers": transformers.__version__, "torch": torch.__version__, "peft": peft.__version__,
            "args": ARGS, "peft_config": PEFT, "log_history": trainer.state.log_history}
    (OUT / "reference.json").write_text(json.dumps(refs, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()

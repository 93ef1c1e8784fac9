"""transformers' `Seq2SeqTrainingArguments()` defaults, as `to_dict()` reports them after
`__post_init__`, for the Rust test that checks `runtime`'s defaults. Writes
tests/fixtures/training_args_defaults.json. Re-run from the repository root:

    python tests/parity/make_args_fixtures.py
"""

import json
from pathlib import Path

import transformers
from transformers import Seq2SeqTrainingArguments

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "training_args_defaults.json"

if __name__ == "__main__":
    d = Seq2SeqTrainingArguments().to_dict()
    d = {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "defaults": d}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(d)} defaults to {OUT}")

"""A small sequence-to-sequence dataset and what transformers makes of it, for
`tests/seq2seq.rs`: `run_summarization.py`'s preprocessing (sources and targets tokenized with
the special tokens, truncated to max_source_length / max_target_length) and
`DataCollatorForSeq2Seq` given the model (labels padded with -100, `decoder_input_ids` from
the model's `_shift_right`), with and without truncation and `pad_to_multiple_of`. Uses the T5
fixture's tokenizer (run make_seq2seq_fixtures.py first). Writes
tests/fixtures/data/seq2seq.jsonl and tests/fixtures/t5/collate.json. Re-run from the
repository root:

    python tests/parity/make_seq2seq_data_fixtures.py
"""

import json
import random
from pathlib import Path

from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, PreTrainedTokenizerFast

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def main():
    rng = random.Random(3)
    words = lambda n: " ".join(f"w{rng.randrange(3, 64)}" for _ in range(n))
    records = [{"source": words(n), "target": words(m)} for n, m in [(3, 2), (9, 5), (1, 1), (5, 7)]]
    data = FIXTURES / "data" / "seq2seq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    model_dir = FIXTURES / "t5" / "model"
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    runs = []
    for settings in [{"max_source_length": None, "max_target_length": None, "pad_to_multiple_of": None},
                     {"max_source_length": 6, "max_target_length": 4, "pad_to_multiple_of": 4}]:
        feats = []
        for r in records:
            f = tok(r["source"], max_length=settings["max_source_length"], truncation=settings["max_source_length"] is not None)
            f["labels"] = tok(text_target=r["target"], max_length=settings["max_target_length"],
                              truncation=settings["max_target_length"] is not None)["input_ids"]
            feats.append(dict(f))
        collator = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100, pad_to_multiple_of=settings["pad_to_multiple_of"])
        b = collator(feats)
        runs.append({"settings": settings, **{k: b[k].tolist() for k in ["input_ids", "attention_mask", "labels", "decoder_input_ids"]}})
    (FIXTURES / "t5" / "collate.json").write_text(json.dumps({"runs": runs}) + "\n")
    print(runs)


if __name__ == "__main__":
    main()

"""Greedy and beam-search references from `transformers.generate` on the parity models, for
`tests/generate.rs`: left-padded prompts of different lengths, `do_sample=False`; beam search
with an EOS the models actually produce, under several length penalties, early-stopping modes
and `num_return_sequences`. Writes
tests/fixtures/<case>/generate.json. Re-run from the repository root after make_fixtures.py:

    python tests/parity/make_generate_fixtures.py
"""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def main():
    g = torch.Generator().manual_seed(5)
    for case in ["gpt2", "llama", "qwen2"]:
        model = AutoModelForCausalLM.from_pretrained(FIXTURES / case / "model", dtype=torch.float32, attn_implementation="eager").eval()
        vocab = model.config.vocab_size
        lengths = [7, 4, 1]
        pad = 0
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
        width = max(lengths)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        runs = []
        for settings in [{}, {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 6}]:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1,
                                     pad_token_id=pad, eos_token_id=2, **settings)
            runs.append({"settings": settings, "generated": [row[width:].tolist() for row in out]})
        # beam search: an EOS that the greedy continuations contain, so beams finish early
        beam_eos = runs[0]["generated"][0][2]
        beams = []
        for settings in [
            {"num_beams": 3},
            {"num_beams": 4, "length_penalty": 0.5, "early_stopping": True, "num_return_sequences": 2},
            {"num_beams": 2, "length_penalty": 2.0, "early_stopping": "never", "no_repeat_ngram_size": 2},
            {"num_beams": 5, "length_penalty": -1.0, "repetition_penalty": 1.3, "num_return_sequences": 3},
        ]:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                     pad_token_id=pad, eos_token_id=beam_eos, **settings)
            beams.append({"settings": settings, "generated": [row[width:].tolist() for row in out]})
        (FIXTURES / case / "generate.json").write_text(json.dumps({"prompts": prompts, "pad_token_id": pad, "eos_token_id": 2,
                                                                    "max_new_tokens": 10, "generated": runs[0]["generated"],
                                                                    "processed": runs[1:],
                                                                    "beam_eos_token_id": beam_eos, "beam_max_new_tokens": 8,
                                                                    "beams": beams}) + "\n")
        print(case, runs)


if __name__ == "__main__":
    main()

"""Greedy and beam-search references from `transformers.generate` on the T5 and BART parity
models (run make_seq2seq_fixtures.py first), for `tests/seq2seq.rs`: sources of different lengths
(right padded, with an attention mask), `do_sample=False`, the decoder starting from
`decoder_start_token_id`, under the model's generation config (BART's forces `<s>` first and
`</s>` last); with logits processors; beam search with an EOS the model produces, under several
length penalties, early-stopping modes and `num_return_sequences`. Writes
tests/fixtures/<case>/generate.json (the generated tokens without the start token). Re-run from
the repository root (every case, or those named):

    python tests/parity/make_seq2seq_generate_fixtures.py [CASE ...]
"""

import sys

import json
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, DynamicCache, EncoderDecoderCache, PreTrainedTokenizerFast

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def main():
    g = torch.Generator().manual_seed(5)
    for case in ["t5", "t5_v1_0", "bart"]:
        model = AutoModelForSeq2SeqLM.from_pretrained(FIXTURES / case / "model", dtype=torch.float32).eval()
        vocab, pad, eos = model.config.vocab_size, model.config.pad_token_id, model.config.eos_token_id
        lengths = [9, 4, 1]
        sources = [torch.randint(max(pad, eos) + 1, vocab, (n,), generator=g).tolist() for n in lengths]
        if len(sys.argv) > 1 and case not in sys.argv[1:]:
            continue
        width = max(lengths)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sources])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources])

        def run(**settings):
            # a cache that grows per layer: transformers 5 sizes its default one by the encoder's
            # layer count, which breaks on a decoder with more layers than the encoder
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad, past_key_values=cache, **settings)
            assert (out[:, 0] == model.config.decoder_start_token_id).all()
            return [row[1:].tolist() for row in out]

        greedy = run(max_new_tokens=10, eos_token_id=eos, num_beams=1)
        processed = []
        for settings in [{"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 6}]:
            processed.append({"settings": settings, "generated": run(max_new_tokens=10, eos_token_id=eos, num_beams=1, **settings)})
        beam_eos = greedy[0][2]  # an EOS the model produces, so beams finish early
        beams = []
        for settings in [
            {"num_beams": 3},
            {"num_beams": 4, "length_penalty": 0.5, "early_stopping": True, "num_return_sequences": 2},
            {"num_beams": 2, "length_penalty": 2.0, "early_stopping": "never", "no_repeat_ngram_size": 2},
        ]:
            beams.append({"settings": settings, "generated": run(max_new_tokens=8, eos_token_id=beam_eos, **settings)})
        # from text, as `runtime generate --prompt` runs: the folder's tokenizer appends </s>
        tok = PreTrainedTokenizerFast.from_pretrained(FIXTURES / case / "model")
        texts = ["w5 w9 w17 w30", "w40"]
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))
        cli = {"prompts": texts, "max_new_tokens": 6, "texts": tok.batch_decode(out, skip_special_tokens=True)}
        (FIXTURES / case / "generate.json").write_text(json.dumps({
            "cli": cli,
            "sources": sources, "pad_token_id": pad, "eos_token_id": eos, "max_new_tokens": 10, "generated": greedy,
            "processed": processed, "beam_eos_token_id": beam_eos, "beam_max_new_tokens": 8, "beams": beams,
        }) + "\n")
        print(case, greedy, beams)


if __name__ == "__main__":
    main()

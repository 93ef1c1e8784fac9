"""A small byte-level BPE tokenizer made with `tokenizers`, wrapped and saved by transformers, and
the reference encodings the Rust data tests compare against. Writes tests/fixtures/tokenizer/
(tokenizer.json, tokenizer_config.json, special_tokens_map.json), tests/fixtures/data/ (small
datasets) and tests/fixtures/tokenizer_reference.json. Re-run from the repository root:

    python tests/parity/make_tokenizer_fixtures.py
"""

import json
import random
from itertools import chain
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent / "fixtures"

# a ChatML-like template using what real templates use: loops, conditionals, filters, a Python
# string method, raise_exception, the special-token variables and add_generation_prompt
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ bos_token }}system\nYou add numbers.{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ bos_token }}{{ m['role'] }}\n{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "12+30="}, {"role": "assistant", "content": "42"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "7+8="}, {"role": "assistant", "content": "15"},
     {"role": "user", "content": "and 1+1="}, {"role": "assistant", "content": "2 (über easy)"}],
]


def corpus(n, seed):
    rng = random.Random(seed)
    words = ["the", "model", "learns", "to", "add", "numbers", "quickly", "and", "then", "answers", "a", "question", "über", "naïve", "café", "日本"]
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) + f" {a}+{b}={a + b}.")
    return out


def main():
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(2000, 0), trainer)
    # a Llama-style template: BOS before every sequence
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", model_max_length=64)
    fast.chat_template = CHAT_TEMPLATE
    out = ROOT / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)

    texts = corpus(6, 1) + ["", "  leading spaces", "über café 日本 naïve", "<|eos|> inside text", "a" * 40]
    ref = {"transformers": transformers.__version__, "encode": []}
    for t in texts:
        with_special = fast(t)["input_ids"]
        ref["encode"].append({
            "text": t,
            "ids": with_special,
            "ids_no_special": fast(t, add_special_tokens=False)["input_ids"],
            "tokens": fast.convert_ids_to_tokens(with_special),
            "decode": fast.decode(with_special),
            "decode_skip_special": fast.decode(with_special, skip_special_tokens=True),
        })
    # padding and truncation as a batch: right and left padding, pad_to_multiple_of
    batch_texts = texts[:4]
    for side in ["right", "left"]:
        fast.padding_side = side
        enc = fast(batch_texts, padding=True, pad_to_multiple_of=8, truncation=True, max_length=24)
        ref[f"batch_{side}"] = {"texts": batch_texts, "max_length": 24, "pad_to_multiple_of": 8, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    ref["chat"] = [{
        "messages": conv,
        "text": fast.apply_chat_template(conv, tokenize=False),
        "text_generation_prompt": fast.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True),
        "ids": list(fast.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]),
    } for conv in CONVERSATIONS]

    # run_clm.py's group_texts on a JSONL file of texts
    data = ROOT / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = corpus(12, 2)
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    fast.padding_side = "right"
    tokenized = [fast(t)["input_ids"] for t in lines]
    block = 16
    concatenated = list(chain(*tokenized))
    total = (len(concatenated) // block) * block
    ref["group_texts"] = {"file": "data/train.jsonl", "block_size": block, "blocks": [concatenated[i:i + block] for i in range(0, total, block)]}
    (ROOT / "tokenizer_reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote tokenizer ({fast.vocab_size} tokens) and references")


if __name__ == "__main__":
    main()

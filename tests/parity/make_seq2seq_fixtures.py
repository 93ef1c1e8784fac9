"""Builds the encoder-decoder parity fixtures that the Rust tests compare against.

For each case it makes a tiny random T5 or BART with transformers + torch, runs a fixed batch
(sources of different lengths, right padded; labels of different lengths padded with -100;
`decoder_input_ids` by the model's `prepare_decoder_input_ids_from_labels`: T5's `_shift_right`,
BART's `shift_tokens_right`), and stores under tests/fixtures/<case>/:

  model/                  the model as transformers saves it
  reference.safetensors   input_ids, attention_mask, labels, decoder_input_ids, logits, loss,
                          grad.<hf name>, loss_smoothed (label smoothing 0.1),
                          after3.<name> (3 AdamW steps with weight decay and clipping),
                          grad_norm (one per step),
                          buckets.<num_buckets>.<max_distance>.<bi|causal> (T5's relative position
                          bucket of every relative position -300..300)
  reference.json          the optimizer settings and which parameters get weight decay

Cases:
  t5       T5 v1.1 / Flan-T5: gated-GELU feed-forward, an untied LM head (no output rescale),
           3 decoder layers against 2 encoder layers
  t5_v1_0  the original T5: ReLU feed-forward, the head tied to the shared embedding and the
           decoder output scaled by d_model ** -0.5
  bart     BART: learned positions (offset 2, at most 40), post-layer norms with biases, GELU,
           `scale_embedding`, `layernorm_embedding`, `final_logits_bias` (set away from 0), the
           shared embedding's `padding_idx`, `forced_bos_token_id` / `forced_eos_token_id`

Re-run from the repository root with a Python that has torch and transformers:

    python tests/parity/make_seq2seq_fixtures.py [CASE ...]
"""

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

OUT = Path(__file__).resolve().parent.parent / "fixtures"

LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM, STEPS, SMOOTHING = 1e-2, (0.9, 0.999), 1e-8, 0.1, 0.5, 3, 0.1


def tiny(**kw):
    return T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, dropout_rate=0.0, layer_norm_epsilon=1e-6,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw,
    )


def untied(model):
    """transformers 5 builds every T5 with the head tied; a Flan-T5 checkpoint stores its own
    `lm_head.weight` and loads untied, so make one the way such a checkpoint is."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sd = load_file(f"{tmp}/model.safetensors")
        g = torch.Generator().manual_seed(7)
        sd["lm_head.weight"] = torch.randn(sd["shared.weight"].shape, generator=g)
        save_file(sd, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        cfg = json.loads(Path(f"{tmp}/config.json").read_text())
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
        Path(f"{tmp}/config.json").write_text(json.dumps(cfg))
        m = T5ForConditionalGeneration.from_pretrained(tmp)
    assert m.lm_head.weight is not m.shared.weight and not m.config.scale_decoder_outputs
    return m


def cases():
    torch.manual_seed(0)
    yield "t5", untied(T5ForConditionalGeneration(tiny(feed_forward_proj="gated-gelu", num_layers=2, num_decoder_layers=3)))
    torch.manual_seed(1)
    m = T5ForConditionalGeneration(tiny(feed_forward_proj="relu", num_layers=2))
    assert m.lm_head.weight is m.shared.weight and m.config.scale_decoder_outputs
    yield "t5_v1_0", m
    torch.manual_seed(2)
    m = BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, encoder_layers=2, decoder_layers=3, max_position_embeddings=40, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True, init_std=0.3,
    ))
    # as bart-large-cnn's generation config (transformers 5 keeps it out of config.json)
    m.generation_config.forced_bos_token_id = 0
    yield "bart", m


def no_decay(name):
    # transformers.Trainer.get_decay_parameter_names: its patterns also keep T5's
    # `relative_attention_bias` (an embedding) out of weight decay, since its name holds "bias".
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return any(re.search(p, name.lower()) for p in patterns)


def batch(model):
    g = torch.Generator().manual_seed(1)
    vocab, pad, eos = model.config.vocab_size, model.config.pad_token_id, model.config.eos_token_id
    low = max(pad, eos) + 1  # no special token inside a sequence
    B, S, T = 3, 12, 7
    ids = torch.randint(low, vocab, (B, S), generator=g)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate([12, 9, 5]):
        mask[b, :n] = 1
        ids[b, n:] = pad
        ids[b, n - 1] = eos
    if model.config.model_type == "bart":
        ids[0, 3] = pad  # a pad token the encoder attends to: its `padding_idx` row gets no gradient
    labels = torch.randint(low, vocab, (B, T), generator=g)
    for b, n in enumerate([7, 4, 6]):
        labels[b, n - 1] = eos
        labels[b, n:] = -100
    return ids, mask, labels, model.prepare_decoder_input_ids_from_labels(labels)


def buckets():
    rel = torch.arange(-300, 301)
    out = {}
    for nb, md in [(32, 128), (8, 20)]:
        for bi in [True, False]:
            b = T5Attention._relative_position_bucket(rel, bidirectional=bi, num_buckets=nb, max_distance=md)
            out[f"buckets.{nb}.{md}.{'bi' if bi else 'causal'}"] = b.to(torch.int64)
    return out


def tokenizer(d, vocab, bart):
    """A word-level tokenizer over the tiny vocabulary (T5: `<pad>`, `</s>`, `<unk>`, then
    `w3`..; BART: `<s>`, `<pad>`, `</s>`, `<unk>`, then `w4`..), adding the special tokens as the
    model's own tokenizer does (T5: `$A </s>`; BART: `<s> $A </s>`), so the command line can
    generate from text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    special = ["<s>", "<pad>", "</s>", "<unk>"] if bart else ["<pad>", "</s>", "<unk>"]
    words = {**{w: i for i, w in enumerate(special)}, **{f"w{i}": i for i in range(len(special), vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bart:
        tok.add_special_tokens(special)  # as BART's own tokenizer.json marks them
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    cfg = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if bart:
        cfg["bos_token"] = "<s>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg) + "\n")


def make(name, model):
    torch.manual_seed(0)
    bart = name.startswith("bart")
    with torch.no_grad():  # norm weights away from 1 and biases away from 0 so that they matter
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((0.0 if pname.endswith(".bias") else 1.0) + 0.1 * torch.randn_like(p))
        if bart:
            model.final_logits_bias.copy_(0.5 * torch.randn_like(model.final_logits_bias))
    model.train()
    d = OUT / name
    shutil.rmtree(d / "model", ignore_errors=True)
    (d / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d / "model")
    tokenizer(d / "model", model.config.vocab_size, bart)

    ids, mask, labels, dec = batch(model)
    ref = {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_input_ids": dec}
    ref.update(buckets())
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref["logits"] = out.logits.detach()
    ref["loss"] = out.loss.detach().reshape(1)
    named = list(model.named_parameters())
    for pname, p in named:
        ref[f"grad.{pname}"] = p.grad.detach().clone()
    # Seq2SeqTrainer's label smoothing (LabelSmoother; the labels are not shifted for these models)
    logits = out.logits.detach().clone().requires_grad_(True)
    ls = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, label_smoothing=SMOOTHING)
    ls.backward()
    ref["loss_smoothed"] = ls.detach().reshape(1)
    ref["dlogits_smoothed"] = logits.grad.detach()

    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    norms = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        opt.step()
    ref["grad_norm"] = torch.tensor(norms)
    for pname, p in named:
        ref[f"after3.{pname}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in ref.items()}, d / "reference.safetensors")
    meta = {
        "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM, "steps": STEPS, "label_smoothing": SMOOTHING,
        "no_decay": [n for n, _ in named if no_decay(n)],
        "parameters": [n for n, _ in named],
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    (d / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: loss {out.loss.item():.6f}, {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    import sys
    for name, model in cases():  # every case, or those named on the command line
        if len(sys.argv) == 1 or name in sys.argv[1:]:
            make(name, model)

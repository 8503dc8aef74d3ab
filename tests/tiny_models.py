"""Tiny random models and a synthetic task with a learnable signal, built on the fly.

Models are saved to a folder with a locally trained WordPiece tokenizer, so tests go
through the same from_pretrained + peft path as real pretrained models.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "horrible", "dreadful", "poor"]
FILLER = ("the a film movie story plot actor scene was is and it this that with very quite "
          "really music ending start some of in on had has").split()


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Sentences whose label is given by one polar word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        # Several polar words among a few fillers: a random 2-layer encoder must be able
        # to pick the signal up in a few dozen steps.
        words = rng.choices(FILLER, k=rng.randint(2, 5)) + rng.choices(POSITIVE if label else NEGATIVE, k=3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT_TEMPLATE = ("{% for m in messages %}[CLS]{{ m['role'] }} {{ m['content'] }}[SEP]{% endfor %}"
                 "{% if add_generation_prompt %}[CLS]assistant {% endif %}")


def build_tokenizer(directory: Path, decoder: bool = False, chat_template: bool = False):
    """A WordPiece tokenizer over a fixed vocabulary (built, not trained: the same ids every time).

    decoder=True: no [CLS]/[SEP] added around texts and [SEP] as the EOS token, like a
    causal LM's tokenizer; chat_template adds a small chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted(set(FILLER + POSITIVE + NEGATIVE + ["good", "bad", "film", "plot", "x", "user", "assistant",
                                                        "system", "which", "word", "say"]))
    tokens = list(dict.fromkeys(specials + letters + ["##" + l for l in letters] + words))  # ordered, unique
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if not decoder:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    names = ["input_ids", "attention_mask"] if decoder else ["input_ids", "token_type_ids", "attention_mask"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   eos_token="[SEP]" if decoder else None, model_input_names=names)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_tiny_bert(directory: Path, masked_lm: bool = False) -> Path:
    """A 2-layer, 64-wide BERT with a pooler, saved like a pretrained checkpoint; masked_lm:
    with its masked-LM head instead (what prompting reads)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id)
    (BertForMaskedLM if masked_lm else BertModel)(config).save_pretrained(directory)
    return directory


# ---------------------------------------------------------- data for the other tasks
def similarity_rows(n: int, seed: int) -> list[dict]:
    """Text pairs scored 0-3 by how many polar words they share a sign with (regression)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 3)
        words = rng.choices(POSITIVE, k=k) + rng.choices(NEGATIVE, k=3 - k) + rng.choices(FILLER, k=2)
        rng.shuffle(words)
        other = rng.choices(FILLER, k=4)
        rows.append({"text": " ".join(words), "text_b": " ".join(other), "label": float(k)})
    return rows


def tagged_rows(n: int, seed: int) -> list[dict]:
    """Sentences whose polar words are entities: B-POS / B-NEG (I- for a second in a row)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(4, 9)):
            kind = rng.random()
            if kind < 0.2:
                tokens.append(rng.choice(POSITIVE))
                tags.append("I-POS" if tags and tags[-1] in ("B-POS", "I-POS") else "B-POS")
            elif kind < 0.4:
                tokens.append(rng.choice(NEGATIVE))
                tags.append("I-NEG" if tags and tags[-1] in ("B-NEG", "I-NEG") else "B-NEG")
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def squad_file(path: Path, n: int, seed: int) -> Path:
    """SQuAD 1.1 json: 'which word was positive' over filler with one positive word."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        answer = rng.choice(POSITIVE)
        words = rng.choices(FILLER + NEGATIVE, k=rng.randint(5, 14))
        words.insert(rng.randint(0, len(words)), answer)
        context = " ".join(words)
        start = len(" ".join(words[: words.index(answer)])) + (1 if words.index(answer) else 0)
        paragraphs.append({"context": context, "qas": [{
            "id": f"q{i}", "question": "which word was good",
            "answers": [{"text": answer, "answer_start": start}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "synthetic", "paragraphs": paragraphs}]}))
    return path


def build_tiny_llama(directory: Path, chat_template: bool = False) -> Path:
    """A 2-layer, 64-wide Llama with a decoder tokenizer, saved like a pretrained checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, decoder=True, chat_template=chat_template)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=True,
                         # Frozen random embeddings at the usual 0.02 scale cap the logits near 1.3
                         # (loss >= ~3.5 over 95 tokens); a wider init lets adapters reach low loss.
                         initializer_range=0.5)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def instruction_rows(n: int, seed: int) -> list[dict]:
    """'say good or bad' about a sentence of polar words -> "good" or "bad"."""
    return [{"instruction": "say good or bad", "input": r["text"], "output": "good" if r["label"] == "pos" else "bad"}
            for r in sentiment_rows(n, seed)]


def text2text_rows(n: int, seed: int) -> list[dict]:
    """A sentence of polar words -> "good" or "bad" (text-to-text, T5's way of classifying)."""
    return [{"source": r["text"], "target": "good" if r["label"] == "pos" else "bad"} for r in sentiment_rows(n, seed)]


def build_tiny_t5(directory: Path) -> Path:
    """A 2-layer, 64-wide T5 (encoder-decoder) with the WordPiece tokenizer: the slot is the
    encoder's [MASK] and the decoder's first position."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, decoder=True)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory

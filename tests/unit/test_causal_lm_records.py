"""Causal-LM records: which tokens the loss sees, text blocks, packing, perplexity."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from shardtune.data import Row
from shardtune.errors import DataError
from shardtune.recipe import validate_recipe
from shardtune.tasks import get_task

IGNORE = -100


def lm_task(tiny_recipe, model_dir, max_length=64, **task):
    raw = {**tiny_recipe, "model": {"path": str(model_dir)}, "task": {"type": "causal_lm", **task},
           "data": {**tiny_recipe["data"], "max_length": max_length}}
    return get_task(validate_recipe(raw))


def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def row(**values):
    return Row(values, "f.jsonl:1")


def test_plain_layout_trains_only_on_the_response(tiny_recipe, tiny_llama):
    task, t = lm_task(tiny_recipe, tiny_llama), tok(tiny_llama)
    [example] = task.encode([row(instruction="say good", input="", output="superb film")], t)
    prompt = t("### Instruction:\nsay good\n\n### Response:\n")["input_ids"]
    response = t("superb film", add_special_tokens=False)["input_ids"] + [t.eos_token_id]
    assert example.features["input_ids"] == prompt + response
    assert example.target == [IGNORE] * len(prompt) + response


def test_chat_template_marks_the_assistant_turn(tiny_recipe, tiny_llama_chat):
    task, t = lm_task(tiny_recipe, tiny_llama_chat), tok(tiny_llama_chat)
    [example] = task.encode([row(instruction="say good", output="superb")], t)
    ids, labels = example.features["input_ids"], example.target
    trained = [i for i, l in zip(ids, labels) if l != IGNORE]
    # [CLS]user say good[SEP][CLS]assistant superb[SEP]: the loss sees "superb[SEP]"
    assert t.convert_ids_to_tokens(trained) == ["superb", "[SEP]"]
    assert all(l == i for i, l in zip(ids, labels) if l != IGNORE)


def test_chat_records_train_every_assistant_turn(tiny_recipe, tiny_llama_chat):
    task, t = lm_task(tiny_recipe, tiny_llama_chat, input="chat"), tok(tiny_llama_chat)
    messages = [{"role": "user", "content": "say good"}, {"role": "assistant", "content": "superb"},
                {"role": "user", "content": "say bad"}, {"role": "assistant", "content": "awful"}]
    [example] = task.encode([row(messages=messages)], t)
    trained = [i for i, l in zip(example.features["input_ids"], example.target) if l != IGNORE]
    assert t.convert_ids_to_tokens(trained) == ["superb", "[SEP]", "awful", "[SEP]"]


def test_train_on_prompt(tiny_recipe, tiny_llama):
    task, t = lm_task(tiny_recipe, tiny_llama, train_on_prompt=True), tok(tiny_llama)
    [example] = task.encode([row(instruction="say good", output="superb")], t)
    assert example.target == example.features["input_ids"]


def test_text_blocks_and_packing(tiny_recipe, tiny_llama):
    t = tok(tiny_llama)
    task = lm_task(tiny_recipe, tiny_llama, max_length=8, input="text")
    rows = [row(text="the film was superb"), row(text="the plot was bad and the music was poor")]
    examples = task.encode(rows, t)
    stream = (t("the film was superb", add_special_tokens=False)["input_ids"] + [t.eos_token_id]
              + t("the plot was bad and the music was poor", add_special_tokens=False)["input_ids"] + [t.eos_token_id])
    assert [e.features["input_ids"] for e in examples] == [stream[0:8], stream[8:16]]  # tail of 1 < 8/4 dropped
    assert all(e.target == e.features["input_ids"] for e in examples)

    packed = lm_task(tiny_recipe, tiny_llama, max_length=64, packing=True)
    records = [row(instruction="say good", output=w) for w in ("superb", "great", "lovely", "good")]
    single = lm_task(tiny_recipe, tiny_llama, max_length=64).encode(records, t)
    together = packed.encode(records, t)
    assert len(together) < len(single) and all(len(e.features["input_ids"]) <= 64 for e in together)
    assert [i for e in together for i in e.features["input_ids"]] == [i for e in single for i in e.features["input_ids"]]
    # Each record keeps its own positions; its first token is never a target.
    assert [p for e in together for p in e.features["position_ids"]] == [
        p for e in single for p in range(len(e.features["input_ids"]))]
    assert [x for e in together for x in e.target] == [x for e in single for x in [IGNORE] + e.target[1:]]


def _packed_and_single(tiny_recipe, tiny_llama, train_on_prompt):
    t = tok(tiny_llama)
    records = [row(instruction=f"say {w}", output=f"{w} film") for w in ("good", "bad", "superb", "awful", "great")]
    options = {"train_on_prompt": train_on_prompt}
    packed = lm_task(tiny_recipe, tiny_llama, max_length=96, packing=True, **options)  # ~31 tokens a record
    single = lm_task(tiny_recipe, tiny_llama, max_length=96, **options)
    return t, packed, packed.encode(records, t), single, single.encode(records, t)


def test_packed_collation_carries_positions_and_no_2d_mask(tiny_recipe, tiny_llama):
    t, packed, examples, _, _ = _packed_and_single(tiny_recipe, tiny_llama, False)
    assert len(examples) == 2 and len(examples[0].features["input_ids"]) > len(examples[1].features["input_ids"])
    batch = packed.collate(examples, t)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no 2-D mask: transformers reads the positions
    short, fill = examples[1].features, batch["input_ids"].shape[1] - len(examples[1].features["input_ids"])
    tail = batch["position_ids"][1, -fill - 1:].tolist()  # the padding continues the last record: no new segment
    assert tail == list(range(short["position_ids"][-1], short["position_ids"][-1] + fill + 1))
    assert (batch["labels"][1, -fill:] == IGNORE).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_a_packed_record_scores_as_it_does_alone(tiny_recipe, tiny_llama, attn, train_on_prompt):
    """No attention across records and positions from 0: each record's summed NLL inside a
    pack equals its NLL alone. Without the position ids (one causal sequence) the later
    records read their neighbours and score differently, which is what this test would catch."""
    t, packed, together, single, alone = _packed_and_single(tiny_recipe, tiny_llama, train_on_prompt)
    model = packed.build_model(str(tiny_llama), {"attn_implementation": attn}).eval()  # as a run builds it

    def token_nll(batch):  # [k, j]: the loss of target j + 1, read at position j
        with torch.no_grad():
            logits = model(**batch).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                 ignore_index=IGNORE, reduction="none")

    with torch.no_grad():
        batch = single.collate(alone, t)
        expected = [float(o[0]) for o in single.outputs(model(**batch), batch)]
    batch = packed.collate(together, t)
    nll, blind_nll = token_nll(batch), token_nll({"input_ids": batch["input_ids"], "labels": batch["labels"]})
    got, blind = [], []
    for k, example in enumerate(together):
        positions = example.features["position_ids"]
        bounds = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for a, b in zip(bounds, bounds[1:]):  # a record at [a, b): its targets a+1..b-1 are read at a..b-2
            got.append(float(nll[k, a:b - 1].sum()))
            blind.append(float(blind_nll[k, a:b - 1].sum()))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert blind[0] == pytest.approx(expected[0], rel=1e-4)  # the first record has no neighbour before it
    assert max(abs(x - y) for x, y in zip(blind, expected)) > 1e-2


@pytest.mark.parametrize("change,fragment", [
    ({"adapter": {"method": "prompt_tuning"}}, "task.packing with adapter.method prompt_tuning"),
    ({"adapter": {"method": "prefix_tuning"}}, "use lora (or another weight adapter) or set task.packing: false"),
    ({"task": {"type": "causal_lm", "packing": True, "input": "text"}}, "task.packing with input: text"),
])
def test_packing_refusals(tiny_recipe, tiny_llama, change, fragment):
    from shardtune.errors import RecipeError

    raw = {**tiny_recipe, "model": {"path": str(tiny_llama)}, "task": {"type": "causal_lm", "packing": True}, **change}
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        validate_recipe(raw)


def test_prompt_longer_than_max_length_is_refused(tiny_recipe, tiny_llama):
    task = lm_task(tiny_recipe, tiny_llama, max_length=8)
    with pytest.raises(DataError, match="f.jsonl:1: no response tokens fit in data.max_length=8"):
        task.encode([row(instruction="which word is good the film was superb", output="superb")], tok(tiny_llama))


@pytest.mark.parametrize("values,fragment", [
    ({"instruction": "", "output": "x"}, "'instruction' is missing or empty"),
    ({"instruction": "say", "answer": "x"}, "'output' is missing or empty"),
])
def test_bad_instruction_rows(tiny_recipe, tiny_llama, values, fragment):
    with pytest.raises(DataError, match=fragment):
        lm_task(tiny_recipe, tiny_llama).encode([row(**values)], tok(tiny_llama))


def test_bad_chat_rows(tiny_recipe, tiny_llama_chat):
    task = lm_task(tiny_recipe, tiny_llama_chat, input="chat")
    with pytest.raises(DataError, match="must be a list of"):
        task.encode([row(messages=[{"role": "robot", "content": "hi"}])], tok(tiny_llama_chat))


def test_per_example_loss_matches_the_model_and_gives_perplexity(tiny_recipe, tiny_llama):
    from transformers import AutoModelForCausalLM

    task, t = lm_task(tiny_recipe, tiny_llama), tok(tiny_llama)
    examples = task.encode([row(instruction="say good", output="superb film"),
                            row(instruction="say bad", output="awful")], t)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    batch = task.collate(examples, t)
    with torch.no_grad():
        out = model(**batch)
    outputs = task.outputs(out, batch)
    metrics = task.metrics(outputs, examples)
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-5)  # HF: mean over label tokens
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert [int(o[1]) for o in outputs] == [3, 2]  # "superb film [SEP]", "awful [SEP]"


def test_gguf_only_for_causal_lm(tiny_recipe, tiny_llama):
    from shardtune.errors import RecipeError

    (tiny_llama / "m.gguf").write_bytes(b"")
    with pytest.raises(RecipeError, match="GGUF files hold causal language models"):
        validate_recipe({**tiny_recipe, "model": {"path": str(tiny_llama), "gguf_file": "m.gguf"}})


def test_fixed_instruction_and_response_map(tiny_recipe, tiny_llama):
    task, t = lm_task(tiny_recipe, tiny_llama, instruction="say good or bad", response_map={"0": "bad", "1": "good"}), \
        tok(tiny_llama)
    [example] = task.encode([row(input="superb film", output=1)], t)
    expected = lm_task(tiny_recipe, tiny_llama).encode([row(instruction="say good or bad", input="superb film",
                                                             output="good")], t)[0]
    assert example.features == expected.features and example.target == expected.target
    with pytest.raises(DataError, match=r"value 7 is not in task.response_map \(\['0', '1'\]\)"):
        task.encode([row(input="x", output=7)], t)

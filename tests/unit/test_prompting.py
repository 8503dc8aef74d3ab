"""Prompt learning pieces, checked by hand: template parsing and rendering per model family,
verbalizer scoring against log-probabilities computed here, calibration and ensemble
arithmetic, label-word selection, few-shot draws, and every refusal."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from shardtune.data import Row
from shardtune.data import few_shot
from shardtune.errors import DataError, RecipeError
from shardtune.prompting import template as tpl
from shardtune.prompting import verbalizer as vb
from shardtune.recipe import validate_recipe
from shardtune.tasks import get_task

VERBALIZER = {"neg": ["bad", "awful"], "pos": ["good"]}


def prompt_recipe(model_path, tmp_path, sentiment_data, **task) -> dict:
    return {"model": {"path": str(model_path)}, "adapter": {"method": "lora", "target_modules": "all-linear"},
            "task": {"type": "prompt_classification", "templates": ["{text} it was {mask}"],
                     "verbalizer": VERBALIZER, **task},
            "data": {"train": str(sentiment_data["train"]), "max_length": 32},
            "output": {"dir": str(tmp_path / "run")}}


def task_and_tokenizer(model_path, tmp_path, sentiment_data, **task):
    from shardtune.backbone import load_tokenizer

    recipe = validate_recipe(prompt_recipe(model_path, tmp_path, sentiment_data, **task))
    task_obj, tokenizer = get_task(recipe), load_tokenizer(recipe)
    task_obj.check(tokenizer)
    return task_obj, tokenizer


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


# ------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("template,pieces", [
    ("{text} it was {mask}", [("field", "text", 0), ("text", " it was ", 0), ("mask", "", 0)]),
    ("{soft} {a}?{mask},{b}", [("soft", "", 1), ("text", " ", 0), ("field", "a", 0), ("text", "?", 0),
                              ("mask", "", 0), ("text", ",", 0), ("field", "b", 0)]),
    ("{soft:3}{text}{ mask }", [("soft", "", 3), ("field", "text", 0), ("mask", "", 0)]),
    ("{soft:It was} {mask} {sentence_1}", [("soft", "It was", 0), ("text", " ", 0), ("mask", "", 0),
                                           ("text", " ", 0), ("field", "sentence_1", 0)]),
])
def test_templates_parse_into_pieces(template, pieces):
    assert [(p.kind, p.value, p.count) for p in tpl.parse(template)] == pieces


@pytest.mark.parametrize("template,problem", [
    ("{text} it was", "needs exactly one {mask}"),
    ("{text} {mask} or {mask}", "found 2"),
    ("it was {mask}", "names no input field"),
    ("{text} {two words} {mask}", "'{two words}' is not a slot"),
    ("{text} {soft:0} {mask}", "give 1 to 128 soft tokens"),
    ("{text} it was {mask", "unbalanced brace"),
])
def test_bad_templates_are_refused_with_the_fix(template, problem, tiny_recipe):
    with pytest.raises(ValueError, match=problem.replace("{", r"\{").replace("(", r"\(")):
        tpl.parse(template)
    raw = copy.deepcopy(tiny_recipe)
    raw["task"] = {"type": "prompt_classification", "templates": [template], "verbalizer": VERBALIZER}
    with pytest.raises(RecipeError, match="task.templates"):
        validate_recipe(raw)


# ------------------------------------------------------------------------ rendering
def test_masked_lm_renders_special_tokens_and_the_mask_slot(tiny_masked_lm, tmp_path, sentiment_data):
    task, tok = task_and_tokenizer(tiny_masked_lm, tmp_path, sentiment_data, templates=["{text} it was {mask} film"])
    example = task.encode([Row({"text": "good film", "label": "pos"}, "r:1")], tok)[0]
    assert tokens(tok, example.features["input_ids"][0]) == ["[CLS]", "good", "film", "it", "was", "[MASK]", "film",
                                                             "[SEP]"]
    assert example.features["slot"] == [5] and example.target == 1  # labels in verbalizer order: neg, pos


def test_causal_lm_ends_at_the_slot_with_soft_tokens_first(tiny_llama, tmp_path, sentiment_data):
    task, tok = task_and_tokenizer(tiny_llama, tmp_path, sentiment_data, templates=["{soft:2} {text} it was {mask}"])
    features = task.encode([Row({"text": "good film", "label": "neg"}, "r:1")], tok)[0].features
    assert tokens(tok, features["input_ids"][0]) == ["[PAD]", "[PAD]", "good", "film", "it", "was"]
    assert features["soft_index"][0] == [0, 1, -1, -1, -1, -1] and features["slot"] == [5]
    batch = task.collate(task.encode([Row({"text": "good film very good", "label": "neg"}, "r:1"),
                                      Row({"text": "bad", "label": "neg"}, "r:2")], tok), tok)
    # left padding: the slot is the last position of every row
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert batch["soft_index"][1].tolist() == [-1, -1, -1, 0, 1, -1, -1, -1]


def test_encoder_decoder_reads_the_decoders_first_position(tiny_t5, tmp_path, sentiment_data):
    task, tok = task_and_tokenizer(tiny_t5, tmp_path, sentiment_data, templates=["{text} {mask} film"])
    features = task.encode([Row({"text": "bad plot", "label": "neg"}, "r:1")], tok)[0].features
    assert tokens(tok, features["input_ids"][0]) == ["bad", "plot", "[MASK]", "film"]
    assert features["decoder_input_ids"] == [[tok.pad_token_id]] and features["slot"] == [0]


def test_chat_template_wraps_the_prompt(tiny_llama_chat, tmp_path, sentiment_data):
    task, tok = task_and_tokenizer(tiny_llama_chat, tmp_path, sentiment_data, templates=["{text} say {mask}"],
                                   chat=True)
    ids = task.encode([Row({"text": "good", "label": "pos"}, "r:1")], tok)[0].features["input_ids"][0]
    assert tokens(tok, ids) == ["[CLS]", "user", "good", "say", "[SEP]", "[CLS]", "assistant"]


def test_long_fields_are_cut_so_the_slot_survives(tiny_masked_lm, tmp_path, sentiment_data):
    task, tok = task_and_tokenizer(tiny_masked_lm, tmp_path, sentiment_data)
    ids = task.encode([Row({"text": "good film " * 40, "label": "pos"}, "r:1")], tok)[0].features["input_ids"][0]
    assert len(ids) <= 32 and tok.mask_token_id in ids and tokens(tok, ids)[-4:] == ["it", "was", "[MASK]", "[SEP]"]


def test_soft_tokens_start_from_their_words_and_can_be_shared(tiny_llama, tmp_path, sentiment_data):
    from shardtune.backbone import load_model

    task, tok = task_and_tokenizer(tiny_llama, tmp_path, sentiment_data,
                                   templates=["{soft:good film} {text} {mask}", "{soft:2} {text} so {mask}"])
    assert task.soft_token_count(tok) == 4
    model = load_model(task.recipe, task, tok)
    table = task.wrap(model, tok).soft_tokens.detach()
    embeddings = model.get_input_embeddings().weight
    assert torch.equal(table[0], embeddings[tok.convert_tokens_to_ids("good")])
    assert torch.equal(table[1], embeddings[tok.convert_tokens_to_ids("film")])
    shared, _ = task_and_tokenizer(tiny_llama, tmp_path, sentiment_data, share_soft_tokens=True,
                                   templates=["{soft:good film} {text} {mask}", "{soft:2} {text} so {mask}"])
    assert shared.soft_token_count(tok) == 2


# -------------------------------------------------------------------------- scoring
def test_label_probabilities_match_a_hand_computation(tiny_llama, tmp_path, sentiment_data):
    """Label score = log of the mean probability of its words; a multi-token word ('xa' =
    x ##a) counts the mean log-probability of its tokens; then normalised over labels."""
    from shardtune.backbone import load_model

    verbalizer = {"neg": ["bad", "xa"], "pos": ["good"]}
    task, tok = task_and_tokenizer(tiny_llama, tmp_path, sentiment_data, verbalizer=verbalizer)
    model = load_model(task.recipe, task, tok)
    prompt = task.wrap(model, tok).eval()
    example = task.encode([Row({"text": "bad film", "label": "neg"}, "r:1")], tok)
    batch = task.collate(example, tok)
    got = prompt(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, 0].exp()

    with torch.no_grad():
        lp = model(input_ids=batch["input_ids"]).logits[0, -1].log_softmax(-1)
    ids = {w: tok(w, add_special_tokens=False)["input_ids"] for w in ["bad", "xa", "good"]}
    assert tokens(tok, ids["xa"]) == ["x", "##a"] and tok.tokenize(" bad") == ["bad"]
    word = {w: float(lp[i].mean()) for w, i in ids.items()}
    neg = math.log((math.exp(word["bad"]) + math.exp(word["xa"])) / 2)
    pos = word["good"]
    expected = torch.tensor([math.exp(neg), math.exp(pos)]) / (math.exp(neg) + math.exp(pos))
    assert torch.allclose(got.float(), expected.float(), atol=1e-5), (got, expected)


def test_calibration_divides_by_the_content_free_probabilities():
    lp = np.log(np.array([[[0.6, 0.4]]]))
    calibrated = np.exp(vb.calibrate(lp, np.log(np.array([[0.8, 0.2]]))))
    assert np.allclose(calibrated, [[[0.75 / 2.75, 2 / 2.75]]])


def test_ensembles_average_probabilities_with_weights():
    lp = np.log(np.array([[[0.9, 0.1], [0.3, 0.7]]]))
    assert np.allclose(np.exp(vb.combine(lp, np.array([1.0, 1.0]))), [[0.6, 0.4]])
    assert np.allclose(np.exp(vb.combine(lp, np.array([3.0, 1.0]))), [[0.75, 0.25]])


def test_learned_weights_favour_the_template_that_is_right():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 200)
    good = np.where(np.eye(2)[targets] == 1, 0.9, 0.1)
    noise = rng.dirichlet([1, 1], 200)
    weights = vb.learn_weights(np.log(np.stack([good, noise], axis=1)), targets)
    assert weights[0] > 0.9 and abs(weights.sum() - 1) < 1e-9


def test_automatic_words_separate_the_classes():
    """Token 5 is likely under class 0 only, token 7 under class 1 only; token 9 is likely
    under both (frequent but useless) and must not be chosen."""
    class_lp = np.full((2, 12), -8.0)
    class_lp[:, 9] = -0.5
    class_lp[0, 5], class_lp[1, 7] = -1.0, -1.2
    class_lp[0, 3], class_lp[1, 4] = -3.0, -3.0
    assert vb.choose_words(class_lp, list(range(12)), 1) == [[5], [7]]
    two = vb.choose_words(class_lp, list(range(12)), 2)
    assert two == [[5, 3], [7, 4]] and 9 not in sum(two, [])


def test_candidates_are_whole_words_spelled_as_one_token(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    scores = np.zeros(len(tok))
    found = [tok.convert_ids_to_tokens(i) for i in vb.candidate_tokens(tok, scores, False, 500)]
    assert "good" in found and not any(t.startswith("##") or t.startswith("[") or len(t) < 2 for t in found)


# ---------------------------------------------------------------------------- few-shot
def test_few_shot_draws_k_rows_per_label_seeded(tiny_recipe):
    task = get_task(validate_recipe(tiny_recipe))
    rows = [Row({"text": f"t{i}", "label": "pos" if i % 3 else "neg"}, f"r:{i}") for i in range(60)]
    drawn = few_shot(rows, 4, task.row_label, seed=1)
    assert sorted(r.get("label") for r in drawn) == ["neg"] * 4 + ["pos"] * 4
    assert [r.where for r in drawn] == [r.where for r in few_shot(rows, 4, task.row_label, seed=1)]
    assert [r.where for r in drawn] != [r.where for r in few_shot(rows, 4, task.row_label, seed=2)]
    with pytest.raises(DataError, match=r"fewer training rows: \{'neg': 20\}"):
        few_shot(rows, 21, task.row_label, seed=1)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("change,problem", [
    ({"verbalizer": {"pos": ["good"]}}, "label words for at least two labels"),
    ({"verbalizer": {"pos": ["good"], "neg": []}}, "have no (or empty) label words"),
    ({"labels": ["neg", "pos", "mixed"]}, "no label words for label(s) ['mixed']"),
    ({"templates": ["{text} {mask}", "{text} so {mask}"], "template_weights": [1.0]}, "has 1 weights for 2"),
    ({"family": "decoder"}, "task.family"),
])
def test_bad_prompt_sections_are_refused(tiny_llama, tmp_path, sentiment_data, change, problem):
    with pytest.raises(RecipeError) as err:
        validate_recipe(prompt_recipe(tiny_llama, tmp_path, sentiment_data, **change))
    assert problem in str(err.value)


@pytest.mark.parametrize("adapter,task_type,problem", [
    ({"method": "frozen"}, "prompt_classification", "nothing would train"),
    ({"method": "frozen"}, "sequence_classification", "frozen trains nothing but a prompt template's {soft}"),
])
def test_frozen_needs_soft_tokens_to_train(tiny_recipe, tiny_llama, tmp_path, sentiment_data, adapter, task_type,
                                           problem):
    raw = prompt_recipe(tiny_llama, tmp_path, sentiment_data) if task_type == "prompt_classification" else \
        copy.deepcopy(tiny_recipe)
    raw["adapter"] = adapter
    with pytest.raises(RecipeError, match=problem.replace("{", r"\{")):
        validate_recipe(raw)


def test_few_shot_is_refused_where_there_are_no_classes(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["task"] = {"type": "token_classification"}
    raw["data"]["few_shot_per_class"] = 4
    with pytest.raises(RecipeError, match="few_shot_per_class draws rows per label"):
        validate_recipe(raw)


@pytest.mark.parametrize("model,change,problem", [
    ("tiny_llama", {"templates": ["{mask} is what {text} was"]}, "{mask} must end the template"),
    ("tiny_llama", {"verbalizer": {"neg": ["bad"], "pos": ["w€nderful"]}}, "is not in the vocabulary"),
    ("tiny_llama", {"chat": True}, "the tokenizer has no chat template"),
    ("tiny_masked_lm", {"templates": ["{text} {soft:zz€} {mask}"]}, "{soft:zz€} is not in the vocabulary"),
])
def test_tokenizer_level_refusals(request, tmp_path, sentiment_data, model, change, problem):
    with pytest.raises(RecipeError, match=problem.replace("{", r"\{")):
        task_and_tokenizer(request.getfixturevalue(model), tmp_path, sentiment_data, **change)


def test_a_checkpoint_without_its_lm_head_is_refused(tiny_bert, tmp_path, sentiment_data):
    from shardtune.backbone import load_model

    task, tok = task_and_tokenizer(tiny_bert, tmp_path, sentiment_data)  # saved as a bare BertModel
    with pytest.raises(RecipeError, match="has no pretrained masked_lm head"):
        load_model(task.recipe, task, tok)


def test_rows_are_checked_against_the_templates(tiny_llama, tmp_path, sentiment_data):
    task, tok = task_and_tokenizer(tiny_llama, tmp_path, sentiment_data, templates=["{review} it was {mask}"])
    with pytest.raises(DataError, match=r"r:3: task.templates\[0\] reads \{review\}, but the row has no column "
                                        r"'review'.*data.columns.review"):
        task.encode([Row({"text": "good", "label": "pos"}, "r:3")], tok)
    task, tok = task_and_tokenizer(tiny_llama, tmp_path, sentiment_data)
    with pytest.raises(DataError, match="r:4: label 'mixed' is not one of the task's labels"):
        task.encode([Row({"text": "good", "label": "mixed"}, "r:4")], tok)

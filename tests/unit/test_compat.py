"""The compatibility rules: every refused cell is refused at validation with its reason, the
docs table is generated from the same rules, and the checks that need the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from matrix_cells import cell_recipe
from shardtune import compat
from shardtune.errors import RecipeError
from shardtune.recipe import validate_recipe

ROOT = Path(__file__).resolve().parents[2]
FAKE = {"bert": "/nowhere/bert", "llama": "/nowhere/llama", "classification": "/nowhere/c.jsonl",
        "tagging": "/nowhere/t.jsonl", "qa": "/nowhere/q.json", "causal_lm": "/nowhere/l.jsonl",
        "prompt": "/nowhere/c.jsonl", "t5": "/nowhere/t5", "seq2seq": "/nowhere/s.jsonl"}
CELLS = [(m, q, z, f) for m in compat.METHODS for q in compat.QUANTIZATION.values()
         for z in compat.ZERO_STAGES for f in compat.FAMILIES]
REFUSED = [c for c in CELLS if compat.refusal(*c) is not None]
ALLOWED = [c for c in CELLS if compat.refusal(*c) is None]


def recipe_for(method, quant, zero, family, **kw):
    return cell_recipe(FAKE, Path("/nowhere/out"), method=method, quant=quant, zero=zero, family=family, **kw)


def test_the_docs_table_is_generated_from_the_rules():
    assert (ROOT / "docs" / "compatibility.md").read_text() == compat.matrix_markdown(), \
        "docs/compatibility.md is stale: run python -m shardtune.compat > docs/compatibility.md"


def test_the_matrix_has_both_kinds_of_cell():
    assert len(CELLS) == 7 * 3 * 4 * 6 and len(ALLOWED) == 321 and len(REFUSED) == 183


@pytest.mark.parametrize("cell", REFUSED, ids=["/".join(map(str, c)) for c in REFUSED])
def test_refused_cells_are_refused_with_the_reason(cell):
    key, reason = compat.refusal(*cell)
    with pytest.raises(RecipeError) as caught:
        validate_recipe(recipe_for(*cell), check_files=False)
    assert reason in str(caught.value)


@pytest.mark.parametrize("cell", ALLOWED[::7], ids=["/".join(map(str, c)) for c in ALLOWED[::7]])
def test_allowed_cells_validate(cell):
    validate_recipe(recipe_for(*cell), check_files=False)


@pytest.mark.parametrize("adapter,quantization,fragment", [
    ({"method": "lora", "init": "pissa"}, {"mode": "nf4"}, "pissa initialises from a singular value decomposition"),
    ({"method": "lora"}, {"mode": "int8", "double_quant": True}, "apply to 4-bit modes"),
    ({"method": "lora", "use_dora": True}, {"mode": "nf4"}, "use_dora recomputes the norm"),
    ({"method": "lora"}, {"mode": "nf4", "compute_dtype": "float16"}, "float16 (model.dtype or"),
    ({"method": "lora", "loraplus_lr_ratio": 0.5}, {"mode": "none"}, "loraplus_lr_ratio: input should be greater"),
    ({"method": "prefix_tuning", "r": 4}, {"mode": "none"}, "adapter.r: unknown key for adapter.method prefix_tuning "
                                                             "(it is a key of lora; to switch methods"),
    ({"method": "qlora"}, {"mode": "none"}, "adapter.method: unknown method 'qlora'"),
])
def test_option_refusals(adapter, quantization, fragment):
    raw = recipe_for("lora", "none", 3, "classification")
    raw["adapter"], raw["quantization"] = adapter, quantization
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        validate_recipe(raw, check_files=False)


@pytest.mark.parametrize("zero, precision, compute, expected", [
    (2, "fp32", None, "uint8"), (2, "bf16", None, "uint8"),          # not partitioned: packed bytes
    (3, "fp32", None, "float32"), (3, "bf16", None, "bfloat16"),     # ZeRO-3: the training precision's dtype,
    (3, "fp32", "bfloat16", "float32"),                              # whatever the matmuls compute in
])
def test_storage_dtype_follows_the_training_precision_under_zero3(zero, precision, compute, expected):
    from shardtune.quantization import bnb_config

    raw = recipe_for("lora", "nf4", zero, "classification", quantization={"compute_dtype": compute} if compute else {})
    raw["sharding"]["precision"] = precision
    assert str(bnb_config(validate_recipe(raw, check_files=False)).bnb_4bit_quant_storage).endswith(expected)


@pytest.mark.parametrize("precision, storage", [("bf16", "float32"), ("bf16", "uint8"), ("fp32", "bfloat16"),
                                                ("fp32", "float16")])
def test_a_storage_dtype_zero3_would_corrupt_is_refused(precision, storage):
    raw = recipe_for("lora", "nf4", 3, "classification", quantization={"storage_dtype": storage})
    raw["sharding"]["precision"] = precision
    want = {"bf16": "bfloat16", "fp32": "float32"}[precision]
    with pytest.raises(RecipeError, match=f"set quantization.storage_dtype: {want}"):
        validate_recipe(raw, check_files=False)
    raw["quantization"]["storage_dtype"] = want  # the matching dtype is accepted
    validate_recipe(raw, check_files=False)


def test_a_prequantised_checkpoint_is_refused_under_zero3(tiny_bert, tmp_path):
    """Saved already quantised (config has quantization_config): ZeRO-3 cannot partition it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from shardtune.compat import check_prequantized

    saved = tmp_path / "bert-4bit"
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model.save_pretrained(saved)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(saved)
    raw = recipe_for("lora", "none", 3, "classification")
    raw["model"]["path"] = str(saved)
    with pytest.raises(RecipeError, match="saved already quantised"):
        check_prequantized(validate_recipe(raw, check_files=False))
    raw["sharding"]["zero_stage"] = 2
    check_prequantized(validate_recipe(raw, check_files=False))  # ZeRO-2 holds it


def test_loraplus_puts_the_b_matrices_on_a_larger_learning_rate(tiny_bert):
    from transformers import AutoTokenizer

    from shardtune import backbone
    from shardtune.adapters import apply_adapter, optimizer_groups
    from shardtune.tasks import get_task

    raw = recipe_for("lora", "none", 2, "classification", adapter={
        "method": "lora", "target_modules": ["query", "value"], "loraplus_lr_ratio": 16})
    raw["model"]["path"] = str(tiny_bert)
    recipe = validate_recipe(raw, check_files=False)
    task = get_task(recipe)
    task.labels = ["neg", "pos"]
    model = apply_adapter(backbone.load_model(recipe, task, AutoTokenizer.from_pretrained(tiny_bert)), recipe, task)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_groups(model, recipe)
    lr = recipe.train.learning_rate
    for group in groups:
        kinds = {("B" if ".lora_B." in names[id(p)] else "other") for p in group["params"]}
        assert kinds == ({"B"} if group["lr"] == pytest.approx(16 * lr) else {"other"}), (group["lr"], kinds)
    assert sorted({g["lr"] for g in groups}) == pytest.approx([lr, 16 * lr])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable
    no_decay = [names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert no_decay and all(n.endswith("bias") or "norm" in n.lower() for n in no_decay)

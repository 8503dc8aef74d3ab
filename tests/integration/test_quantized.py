"""Quantised backbones end to end: the CPU 4-bit gradient guard against a dequantised
reference, a 4-bit run through `shardtune run` reloaded with plain peft + bitsandbytes, and
`shardtune merge` for plain and quantised runs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import write_recipe
from shardtune.cli import app
from shardtune.recipe import validate_recipe

pytestmark = pytest.mark.integration
cli = CliRunner()


# ------------------------------------------------------------- the 4-bit gradient trap
def _lora_4bit_and_reference(tiny_llama):
    """A 4-bit LoRA model through shardtune's loader, and the same adapter on an fp32 model
    whose linear weights are the 4-bit weights dequantised."""
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    from shardtune import backbone
    from shardtune.adapters import apply_adapter
    from shardtune.tasks import get_task

    def build(mode):
        raw = {"model": {"path": str(tiny_llama)}, "quantization": {"mode": mode},
               "adapter": {"method": "lora", "target_modules": ["q_proj", "v_proj", "down_proj"], "init": "gaussian"},
               "task": {"type": "causal_lm"}, "data": {"train": "/x.jsonl"}, "output": {"dir": "/x"}}
        recipe = validate_recipe(raw, check_files=False)
        task = get_task(recipe)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        torch.manual_seed(0)
        return apply_adapter(backbone.load_model(recipe, task, tokenizer), recipe, task), tokenizer

    quantized, tokenizer = build("nf4")
    reference, _ = build("none")
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.get_submodule(name).weight.copy_(weight.to(torch.float32))
        reference.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    batch = tokenizer(["good film very good", "bad plot and awful music"], return_tensors="pt", padding=True)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["input_ids"]}
    return quantized, reference, batch


def _lora_grads(model, batch):
    model.eval()
    with torch.no_grad():  # an evaluation pass: what triggers the repacking on AVX512-BF16 CPUs
        model(**batch)
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    # No gradient at all (the repacked kernel cuts the graph) counts as a zero gradient.
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters() if p.requires_grad}


def test_4bit_lora_gradients_match_a_dequantised_reference_after_an_eval_pass(tiny_llama):
    quantized, reference, batch = _lora_4bit_and_reference(tiny_llama)
    ours, theirs = _lora_grads(quantized, batch), _lora_grads(reference, batch)
    assert ours.keys() == theirs.keys() and len(ours) == 12
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-5, msg=name)


def test_without_the_guard_the_gradients_are_wrong_on_this_cpu(tiny_llama):
    """The trap the guard exists for, shown on CPUs that have it (AVX512-BF16)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    quantized, reference, batch = _lora_4bit_and_reference(tiny_llama)
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: the repacking never happens here")
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes does by default
    ours, theirs = _lora_grads(quantized, batch), _lora_grads(reference, batch)
    error = sum(float((ours[n] - theirs[n]).norm()) for n in ours) / sum(float(theirs[n].norm()) for n in ours)
    assert error > 0.1, "the unguarded gradients matched: the trap is gone, the guard may be dropped"


# ------------------------------------------------------------ 4-bit run, reload, merge
@pytest.fixture(scope="module")
def qlora_run(ray_session, tiny_bert, sentiment_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlora")
    raw = {
        "model": {"path": str(tiny_bert)},
        "quantization": {"mode": "nf4", "double_quant": True},
        "adapter": {"method": "lora", "target_modules": ["query", "value"], "init": "gaussian"},
        "data": {"train": str(sentiment_data["train"]), "max_length": 32},
        "train": {"epochs": 2, "micro_batch_size": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0},
        "sharding": {"zero_stage": 3},
        "cluster": {"workers": 2},
        "output": {"dir": str(folder / "run")},
    }
    result = cli.invoke(app, ["run", str(write_recipe(folder / "r.yaml", raw))])
    assert result.exit_code == 0, result.output
    return {"dir": folder / "run", "raw": raw, "folder": folder}


def _outputs(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.numpy()


TEXTS = ["good film very good", "bad plot and awful music", "the story was superb"]


def test_qlora_run_learns_and_saves_only_the_adapter(qlora_run):
    from safetensors import safe_open

    metrics = json.loads((qlora_run["dir"] / "metrics.json").read_text())
    assert metrics["final"]["accuracy"] >= 0.8 > metrics["before"]["accuracy"]
    with safe_open(qlora_run["dir"] / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any("classifier" in k for k in keys)
    assert not any(q in k for k in keys for q in ("absmax", "quant_map", "quant_state"))


def test_qlora_run_reloads_with_plain_peft_and_bitsandbytes(qlora_run, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from shardtune.inference import load_run
    from shardtune.quantization import guard_cpu_4bit_gradients

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32,
                                llm_int8_skip_modules=["classifier", ".*pooler"])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, quantization_config=config)
    guard_cpu_4bit_gradients(base)
    plain = PeftModel.from_pretrained(base, qlora_run["dir"] / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(qlora_run["dir"] / "tokenizer")
    ours = load_run(qlora_run["dir"])
    np.testing.assert_allclose(_outputs(plain, tokenizer, TEXTS), _outputs(ours.model, tokenizer, TEXTS),
                               rtol=1e-5, atol=1e-5)


def test_merge_of_a_qlora_run_matches_the_full_precision_base_plus_adapter(qlora_run, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = qlora_run["folder"] / "merged"
    result = cli.invoke(app, ["merge", str(qlora_run["dir"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert not hasattr(merged.config, "quantization_config")  # full precision, standalone
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    unmerged = PeftModel.from_pretrained(base, qlora_run["dir"] / "adapter")
    np.testing.assert_allclose(_outputs(merged, tokenizer, TEXTS), _outputs(unmerged, tokenizer, TEXTS),
                               rtol=1e-4, atol=1e-5)
    again = cli.invoke(app, ["merge", str(qlora_run["dir"]), "--out", str(out)])
    assert again.exit_code != 0 and "already exists and is not empty" in again.output


@pytest.mark.parametrize("method,fragment", [
    ("prompt_tuning", "no weights to merge it into"),
])
def test_merge_refuses_soft_prompts(qlora_run, tmp_path, method, fragment):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(qlora_run["dir"], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["adapter"] = {"method": method}
    recipe["quantization"] = {"mode": "none"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = cli.invoke(app, ["merge", str(run), "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and fragment in result.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_merge_of_an_ia3_run_matches_base_plus_adapter(qlora_run, tmp_path):
    """A second adapter family through merge, unquantised and under ZeRO-0."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    raw = copy.deepcopy(qlora_run["raw"])
    raw.update(quantization={"mode": "none"}, adapter={"method": "ia3"}, sharding={"zero_stage": 0},
               output={"dir": str(tmp_path / "run")})
    raw["train"]["epochs"] = 1
    assert cli.invoke(app, ["run", str(write_recipe(tmp_path / "r.yaml", raw))]).exit_code == 0
    assert cli.invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]).exit_code == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(raw["model"]["path"], num_labels=2)
    unmerged = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    np.testing.assert_allclose(_outputs(merged, tokenizer, TEXTS), _outputs(unmerged, tokenizer, TEXTS),
                               rtol=1e-4, atol=1e-5)

"""Saving a trained run in the ecosystem's formats (adapter or model, metrics.json) and
merging an adapter into its base. Loading a run back and running it is inference.py's;
the run directory's layout and names are rundir.py's.
"""

from __future__ import annotations

import json
from pathlib import Path


from shardtune.errors import RunError
from shardtune.partitions import whole
from shardtune.rundir import TASK_STATE
from shardtune.tasks import get_task


def save_trained(engine, directory: Path, *, is_peft: bool, zero_stage: int, is_main: bool) -> None:
    """Write the adapter (or the full model) from rank 0; every rank must call this.

    Under ZeRO-3 each rank holds a slice of every parameter. An adapter is small: its
    parameters are gathered whole. A fully fine-tuned model is not: DeepSpeed's 16-bit
    consolidation gathers one module at a time onto rank 0 only, so no rank ever holds the
    whole model twice, and the other ranks none of it.
    """
    model = engine.module
    if zero_stage == 3 and not is_peft:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gets it, the others {}
        if is_main:
            model.save_pretrained(directory / "model", state_dict=state_dict, safe_serialization=True)
        return
    with whole([p for p in model.parameters() if p.requires_grad]):  # the adapter, under ZeRO-3
        if is_main:
            model.save_pretrained(directory / ("adapter" if is_peft else "model"), safe_serialization=True)


def write_metrics(run_dir: Path, recipe, wall_seconds: float) -> dict:
    """Turn the workers' history.json into the run's metrics.json."""
    record = json.loads((run_dir / "history.json").read_text())
    history, summary = record["history"], record["summary"]
    summary["wall_seconds"] = round(wall_seconds, 2)
    metrics = {"before": history[0] if recipe.train.eval_before_training else None,
               "final": history[-1], "history": history, "steps": record.get("steps", []), "summary": summary}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run_dir / "history.json").unlink()
    return metrics


def model_card(run_dir: Path, recipe, out_dir: Path):
    """The merged model's README.md (Hugging Face's model card format): its base, adapter,
    recipe and final metrics, and how to load it."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    base = recipe.model.path
    hub_id = "/" in base and not base.startswith(("package:", "/", ".")) and not Path(base).exists()
    data = ModelCardData(library_name="transformers", base_model=base if hub_id else None,
                         tags=["shardtune", recipe.adapter.method, recipe.task.type])
    metrics_file = run_dir / "metrics.json"
    final = json.loads(metrics_file.read_text())["final"] if metrics_file.is_file() else {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in final.items()
                      if k not in ("epoch", "step") and isinstance(v, (int, float)))
    adapter = recipe.adapter.model_dump(mode="json")
    text = "\n".join([
        f"---\n{data.to_yaml()}\n---", f"# {run_dir.name} (merged)", "",
        f"Fine-tuned with shardtune from `{base}`: task `{recipe.task.type}`, adapter "
        f"`{recipe.adapter.method}` merged into the full-precision base weights, trained for "
        f"{recipe.train.epochs} epochs at learning rate {recipe.train.learning_rate:g}, inputs cut at "
        f"{recipe.data.max_length} tokens (the tokenizer's model_max_length).", "",
        "## Final validation metrics", "", "| metric | value |", "| --- | --- |", rows or "| (none) | |", "",
        "## Adapter", "", "```yaml", yaml.safe_dump(adapter, sort_keys=False).strip(), "```", "",
        "## Use", "", "```python", "from transformers import pipeline", "",
        f"pipe = pipeline(model=\"{out_dir}\", truncation=True)", "```", "",
        "## Recipe", "", "```yaml", recipe.to_yaml().strip(), "```", ""])
    return ModelCard(text)


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a run's adapter into its base weights and write a standalone model folder.

    The base is loaded unquantised even for a quantised (QLoRA) run: merging into 4-bit
    codes would round the update away. Load the result with a BitsAndBytesConfig to
    quantise it again. Soft prompts have no weights to merge into.
    """
    import shutil

    from peft import PeftModel

    from shardtune.adapters import adapter_family
    from shardtune.backbone import load_model, load_tokenizer_from
    from shardtune.recipe import load_recipe

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise RunError(f"'{run_dir}' is not a finished shardtune run: recipe.yaml is missing")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunError(f"'{out_dir}' already exists and is not empty; choose a new --out folder")
    recipe = load_recipe(run_dir / "recipe.yaml", check_files=False)
    method = recipe.adapter.method
    family = adapter_family(method)
    if recipe.task.has_soft_tokens():  # always so for adapter.method frozen
        raise RunError("this run's templates have trained {soft} tokens, which live outside the model's weights; "
                       f"load it with `shardtune eval/predict {run_dir}` instead of merging")
    if family.soft_prompt:
        raise RunError(f"a {method} adapter adds soft tokens to every input; there are no weights to merge it "
                       f"into. Load {run_dir / 'adapter'} with peft's PeftModel.from_pretrained instead")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = load_tokenizer_from(run_dir / "tokenizer")
    if family.saves == "model":  # full fine-tuning: the run already holds the whole model
        shutil.copytree(run_dir / "model", staging)
    else:
        task = get_task(recipe)
        task.load_state(json.loads((run_dir / TASK_STATE).read_text()))
        base = load_model(recipe, task, tokenizer, quantize=False)
        merged = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
        merged.save_pretrained(staging, safe_serialization=True)
    # The training length travels with the tokenizer: a plain `pipeline(..., truncation=True)`
    # then cuts inputs where shardtune did, and predicts what `shardtune predict` predicts.
    tokenizer.model_max_length = recipe.data.max_length
    tokenizer.save_pretrained(staging)
    model_card(run_dir, recipe, out_dir).save(staging / "README.md")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    staging.rename(out_dir)
    return out_dir

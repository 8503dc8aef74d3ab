"""Saving a trained run in the ecosystem's formats, and loading it back for eval/predict.

The run directory's layout and names are rundir.py's.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shardtune.errors import RunError
from shardtune.rundir import TASK_STATE
from shardtune.tasks import Can, get_task, kind_of, task_kinds
from shardtune.tasks.registry import kind_of_task


def save_trained(model: torch.nn.Module, directory: Path, *, is_peft: bool, zero_stage: int,
                 is_main: bool) -> None:
    """Write the adapter (or the full model) from rank 0; every rank must call this.

    Under ZeRO-3 each rank holds a slice of every parameter, so the trainable ones are
    gathered first; without that the saved adapter would hold empty tensors.
    """
    params = [p for p in model.parameters() if p.requires_grad] if is_peft else list(model.parameters())
    if zero_stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        gathered = nullcontext()
    with gathered:
        if is_main:
            model.save_pretrained(directory / ("adapter" if is_peft else "model"), safe_serialization=True)


def write_metrics(run_dir: Path, recipe, wall_seconds: float) -> dict:
    """Turn the workers' history.json into the run's metrics.json."""
    record = json.loads((run_dir / "history.json").read_text())
    history, summary = record["history"], record["summary"]
    summary["wall_seconds"] = round(wall_seconds, 2)
    metrics = {"before": history[0] if recipe.train.eval_before_training else None,
               "final": history[-1], "history": history, "summary": summary}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run_dir / "history.json").unlink()
    return metrics


@torch.no_grad()
def forward_outputs(model: torch.nn.Module, task, tokenizer, examples, batch_size: int,
                    device: torch.device) -> list[np.ndarray]:
    """The model's outputs for examples, in order: one float32 array per example."""
    was_training = model.training
    model.eval()
    outputs: list[np.ndarray] = []
    kind = kind_of_task(task)
    if kind.can(Can.PREPARE_FORWARD):  # e.g. a prompt task's content-free calibration input
        task.before_forward(model, tokenizer, device)
    for start in range(0, len(examples), batch_size):
        batch = task.collate(examples[start:start + batch_size], tokenizer)
        if kind.can(Can.GENERATE_AT_EVAL):  # the targets stay: a teacher-forced loss, and texts to compare
            outputs.extend(task.eval_outputs(model, {k: v.to(device) for k, v in batch.items()}, tokenizer))
            continue
        for key in task.target_keys:
            batch.pop(key, None)
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs.extend(task.outputs(model(**batch), batch))
    model.train(was_training)
    return outputs


@dataclass
class LoadedRun:
    recipe: object
    task: object
    tokenizer: object
    model: torch.nn.Module


def load_run(run_dir: str | Path, data_overrides: list[str] | None = None) -> LoadedRun:
    """Rebuild a trained model from a run directory with plain transformers + peft;
    `data_overrides` (data.KEY=VALUE) change how files are read, not the model."""
    from peft import PeftModel

    from shardtune.backbone import load_kwargs, load_model, load_tokenizer_from, refusing_remote_code
    from shardtune.recipe import load_recipe

    run_dir = Path(run_dir)
    for needed in ("recipe.yaml", TASK_STATE, "tokenizer"):
        if not (run_dir / needed).exists():
            raise RunError(f"'{run_dir}' is not a finished shardtune run: {needed} is missing "
                           "(give the output.dir of a run that completed)")
    recipe = load_recipe(run_dir / "recipe.yaml", data_overrides or [], check_files=False)
    task = get_task(recipe)
    task.load_state(json.loads((run_dir / TASK_STATE).read_text()))
    tokenizer = load_tokenizer_from(run_dir / "tokenizer")
    if (run_dir / "adapter").is_dir():
        saved = run_dir / "adapter"
        model = load_model(recipe, task, tokenizer)
        if (saved / "adapter_config.json").is_file():  # else adapter.method frozen: soft tokens only
            model = PeftModel.from_pretrained(model, saved)
    elif (run_dir / "model").is_dir():
        saved = run_dir / "model"
        with refusing_remote_code(saved):
            model = task.build_model(str(saved), load_kwargs(recipe))
    else:
        raise RunError(f"'{run_dir}' holds neither adapter/ nor model/; the run did not finish")
    if kind_of(recipe).can(Can.WRAP_MODEL):
        model = task.wrap(model, tokenizer, saved=str(saved))
    model.eval()
    return LoadedRun(recipe, task, tokenizer, model)


def load_zero_shot(recipe) -> LoadedRun:
    """The untrained backbone behind a prompt recipe's templates and verbalizer: zero-shot
    inference (`shardtune eval RECIPE.yaml`). An automatic verbalizer reads the recipe's
    training data to find its words; soft tokens are refused, as nothing has trained them."""
    from shardtune.backbone import load_model, load_tokenizer
    from shardtune.errors import RecipeError

    if not kind_of(recipe).can(Can.ZERO_SHOT):
        able = [kind.type for kind in task_kinds() if kind.can(Can.ZERO_SHOT)]
        raise RecipeError(f"zero-shot evaluation needs task.type {' or '.join(able)} (a template and a "
                          f"verbalizer), not {recipe.task.type}: its head is untrained until a run trains it. "
                          "Give a finished run's directory instead")
    if recipe.task.has_soft_tokens():
        raise RecipeError("task.templates: {soft} tokens are trained parameters, and zero-shot inference trains "
                          "nothing; use hand-written templates for zero-shot, or train the recipe first")
    task = get_task(recipe)
    tokenizer = load_tokenizer(recipe)
    task.check(tokenizer)
    model = load_model(recipe, task, tokenizer)
    if task.verbalizer is None:  # verbalizer: auto
        from shardtune.data.pipeline import load_data

        rows = load_data(recipe, task, tokenizer, encode=False).train_rows
        examples = task.encode(rows[:recipe.task.auto_verbalizer.max_examples], tokenizer)
        task.fit_verbalizer(model, tokenizer, examples, torch.device("cpu"))
    model = task.wrap(model, tokenizer).eval()
    return LoadedRun(recipe, task, tokenizer, model)


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
    tokenizer.save_pretrained(staging)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    staging.rename(out_dir)
    return out_dir

"""Running a model on examples: batched forward passes (or generation, for the tasks that
evaluate by generating), and loading what they run on: a finished run's directory, or a
prompt recipe's untrained backbone (zero-shot). Used by evaluation inside training
(engine.evaluate), by `shardtune eval/predict/generate`, and by the benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shardtune.errors import RunError
from shardtune.rundir import TASK_STATE
from shardtune.tasks import Can, get_task, kind_of, task_kinds
from shardtune.tasks.registry import kind_of_task


@torch.no_grad()
def forward_outputs(model: torch.nn.Module, task, tokenizer, examples, batch_size: int,
                    device: torch.device, progress=None) -> list[np.ndarray]:
    """The model's outputs for examples, in order: one float32 array per example.
    `progress(done, total)` is called after each batch (the CLI's progress bar)."""
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
            if progress is not None:
                progress(min(start + batch_size, len(examples)), len(examples))
            continue
        for key in task.target_keys:
            batch.pop(key, None)
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs.extend(task.outputs(model(**batch), batch))
        if progress is not None:
            progress(min(start + batch_size, len(examples)), len(examples))
    model.train(was_training)
    return outputs


@dataclass
class LoadedRun:
    recipe: object
    task: object
    tokenizer: object
    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def inference_device() -> torch.device:
    """Where eval, predict, generate and report run: this machine's GPU when it has one
    (CUDA_VISIBLE_DEVICES picks which), else its CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _on_device(model: torch.nn.Module) -> torch.nn.Module:
    # A quantised backbone was loaded onto the GPU by from_pretrained already (device_map).
    device = inference_device()
    if next(model.parameters()).device.type != device.type:
        model = model.to(device)
    return model


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
    model = _on_device(model).eval()
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
    model = _on_device(load_model(recipe, task, tokenizer))
    if task.verbalizer is None:  # verbalizer: auto
        from shardtune.data.pipeline import load_data

        rows = load_data(recipe, task, tokenizer, encode=False).train_rows
        examples = task.encode(rows[:recipe.task.auto_verbalizer.max_examples], tokenizer)
        task.fit_verbalizer(model, tokenizer, examples, next(model.parameters()).device)
    model = _on_device(task.wrap(model, tokenizer)).eval()
    return LoadedRun(recipe, task, tokenizer, model)

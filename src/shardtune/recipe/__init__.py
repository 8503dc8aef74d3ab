"""The recipe: the user's whole interface, as a typed schema.

A recipe is YAML, loaded with a safe loader and validated here before anything
starts. Unknown keys are errors with a did-you-mean; cross-field rules
(`check_rules`) run before any worker starts. Loading never imports or runs
code named in the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shardtune import compat, quantization
from shardtune.errors import RecipeError
from shardtune.recipe.messages import _did_you_mean, explain_errors
from shardtune.recipe.sections import *  # noqa: F403  (the schema, re-exported: shardtune.recipe.X)
from shardtune.recipe.sections import DATA_FORMATS, Recipe
from shardtune.tasks.registry import Can, formats_for, task_kind, task_kinds
from shardtune.sources import resolve_local


# ----------------------------------------------------------------- loading & rules
def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """`train.epochs=1` -> (['train', 'epochs'], 1); values are YAML scalars/lists."""
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override '{pair}' is not of the form section.key=value "
                              "(e.g. train.epochs=1)")
        try:
            value = safe_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise RecipeError(f"override '{pair}': value is not valid YAML ({exc.problem})") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict, pairs: list[str]) -> dict:
    for path, value in parse_overrides(pairs):
        set_value(raw, path, value)
    return raw


def set_value(raw: dict, path: list[str], value: Any) -> dict:
    """Set `section.key` (as a path) in a raw recipe, making the sections it lacks."""
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise RecipeError(f"'{'.'.join(path)}': '{where}' is a value, not a section")
        node = child
    node[path[-1]] = value
    return raw


MAX_RECIPE_BYTES = 1_000_000
MAX_YAML_ALIASES = 20  # ~1,500 values at most, however they nest


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses an alias bomb: a few lines of `&a [*b, *b, ...]` that expand
    to billions of values and kept `validate` busy for minutes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases = getattr(self, "aliases", 0) + 1
            if self.aliases > MAX_YAML_ALIASES:
                raise RecipeError(f"more than {MAX_YAML_ALIASES} YAML aliases (*name); a recipe needs few or none, "
                                  "so write the values out")
        return super().compose_node(parent, index)


def safe_yaml(text: str):
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"the file is {path.stat().st_size:,} bytes; a recipe is a few kB of YAML (at most "
                              f"{MAX_RECIPE_BYTES:,} bytes)", where=str(path))
        raw = safe_yaml(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.start}); a recipe is a YAML file", where=str(path)) from None
    except RecipeError as exc:
        raise RecipeError(exc.problems, where=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"not valid YAML{line}: {getattr(exc, 'problem', exc)}", where=str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError("a recipe is a mapping of sections (model, data, train, ...)", where=str(path))
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, check_files: bool = True) -> Recipe:
    """Load, override, validate and check cross-field rules. Raises RecipeError."""
    raw = apply_overrides(load_raw(path), overrides or [])
    return validate_recipe(raw, where=str(path), check_files=check_files)


def validate_recipe(raw: dict, *, where: str = "recipe", check_files: bool = True) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(explain_errors(exc.errors()), where=where) from None
    problems = check_rules(recipe, check_files=check_files)
    if check_files:
        from shardtune.rundir import output_dir_problems

        problems += output_dir_problems(recipe.output.dir, _local_inputs(recipe, where))
    if problems:
        raise RecipeError(problems, where=where)
    return absolute_paths(recipe)


def _local_inputs(recipe: Recipe, where: str) -> list[Path]:
    """The recipe file and the local files and folders it reads, resolved."""
    found = [Path(where).resolve()] if Path(where).is_file() else []
    specs = [recipe.model.path, recipe.data.train.path]
    if recipe.data.validation is not None:
        specs.append(recipe.data.validation.path)
    for spec in specs:
        try:
            local = resolve_local(spec)
        except RecipeError:
            continue  # reported by check_rules
        if local is not None:
            found.append(local)
    return found


def absolute_paths(recipe: Recipe) -> Recipe:
    """Pin relative paths to the directory the recipe was loaded from (the current one).

    Ray workers run in their own working directories, and a saved run must find its base
    model from anywhere. Hub ids and package: paths are left as written: those resolve
    on each node.
    """
    def pin(spec: str) -> str:
        if spec.startswith("package:"):
            return spec
        local = resolve_local(spec)
        return str(local) if local is not None else spec

    recipe.model.path = pin(recipe.model.path)
    recipe.data.train.path = pin(recipe.data.train.path)
    if recipe.data.validation is not None:
        recipe.data.validation.path = pin(recipe.data.validation.path)
    recipe.output.dir = str(Path(recipe.output.dir).expanduser().resolve())
    return recipe


def check_rules(recipe: Recipe, *, check_files: bool = True) -> list[str]:
    """Cross-field rules, each with the fix. Empty list: the recipe can run."""
    problems: list[str] = []
    sh, cl, tr = recipe.sharding, recipe.cluster, recipe.train

    if sh.offload_params and sh.zero_stage != 3:
        problems.append(f"sharding.offload_params needs sharding.zero_stage: 3 (got {sh.zero_stage}); "
                        "set zero_stage: 3 or offload_params: false")
    if sh.offload_optimizer and sh.zero_stage == 0:
        problems.append("sharding.offload_optimizer needs ZeRO stage 1, 2 or 3; set sharding.zero_stage: 2")
    problems += _slurm_problems(recipe)
    if sh.precision == "fp16" and cl.gpus_per_worker == 0:
        problems.append("sharding.precision: fp16 needs GPUs (cluster.gpus_per_worker > 0); "
                        "use fp32 or bf16 on CPU")
    problems += compat.recipe_problems(recipe)
    q = recipe.quantization
    if q.mode == "int8" and (q.double_quant or q.compute_dtype or q.storage_dtype):
        problems.append("quantization.double_quant, compute_dtype and storage_dtype apply to 4-bit modes (nf4, fp4); "
                        "remove them for int8")
    if (storage := quantization.storage_problem(recipe)) is not None:
        problems.append(storage)
    if q.mode != "none" and "float16" in (q.compute_dtype, recipe.model.dtype) and cl.gpus_per_worker == 0:
        problems.append("float16 (model.dtype or quantization.compute_dtype) needs GPUs; use float32 or bfloat16 on CPU")
    kind = task_kind(recipe.task.type)
    if recipe.model.gguf_file and not kind.causal_backbone:
        causal = [k.type for k in task_kinds() if k.causal_backbone]
        problems.append(f"model.gguf_file: GGUF files hold causal language models; use task.type: "
                        f"{' or '.join(causal)}, or a transformers model directory")
    problems += [message for rule in kind.rules if (message := rule.message(recipe))]
    if recipe.data.augment is not None:
        if not kind.can(Can.AUGMENT):
            augmenting = [k.type for k in task_kinds() if k.can(Can.AUGMENT)]
            problems.append(f"data.augment: augmentation is for {', '.join(augmenting)}; "
                            f"remove it for {recipe.task.type}")
        elif recipe.data.augment.synonym_replace and check_files:
            from shardtune.data.augment import wordnet_missing

            if (missing := wordnet_missing()) is not None:
                problems.append(f"data.augment.synonym_replace: {missing}")
    if tr.warmup_steps is not None and tr.max_steps is not None and tr.warmup_steps >= tr.max_steps:
        problems.append(f"train.warmup_steps ({tr.warmup_steps}) must be below train.max_steps ({tr.max_steps})")

    if recipe.data.few_shot_per_class and not kind.can(Can.CLASS_LABELS):
        labelled = [k.type for k in task_kinds() if k.can(Can.CLASS_LABELS)]
        problems.append(f"data.few_shot_per_class draws rows per label: it applies to {' and '.join(labelled)}; "
                        "remove it")
    task_roles = kind.roles_of(recipe.task)
    for role in recipe.data.columns:
        if role not in task_roles:
            problems.append(f"data.columns.{role}: not a column role of task {recipe.task.type}"
                            f"{_did_you_mean(role, task_roles)}; roles are {sorted(task_roles)}")

    sources = [("data.train", recipe.data.train)]
    if recipe.data.validation is not None:
        sources.append(("data.validation", recipe.data.validation))
    for name, src in sources:
        fmt, readers = src.resolved_format, formats_for()
        if fmt in readers and recipe.task.type not in readers[fmt]:
            problems.append(f"{name}.format: {fmt} files hold data for {' or '.join(sorted(readers[fmt]))}, "
                            f"not task.type {recipe.task.type}")
        if not fmt:
            problems.append(f"{name}.format: cannot tell the format of '{src.path}' from its suffix; "
                            f"set format to one of {list(DATA_FORMATS)}")
        if fmt in ("csv", "tsv") and not src.header and not src.column_names:
            problems.append(f"{name}.column_names: '{src.path}' has no header row, so name its columns "
                            "(e.g. column_names: [label, sentence])")
        if check_files:
            problems += _check_exists(name + ".path", src.path, want_dir=(fmt == "textdir"))

    if check_files:
        try:
            local = resolve_local(recipe.model.path)
        except RecipeError as exc:
            problems.append(f"model.path: {exc.problems[0]}")
        else:
            if local is not None and not local.exists():
                problems.append(f"model.path: '{recipe.model.path}' does not exist; give a local model "
                                "directory, a hub id, or package:NAME/PATH")
            if local is not None and recipe.model.gguf_file and not (local / recipe.model.gguf_file).is_file():
                problems.append(f"model.gguf_file: '{recipe.model.gguf_file}' is not a file in {local}")
            elif local is not None and local.is_file():
                problems.append(f"model.path: '{recipe.model.path}' is a file; give the model's folder (the one "
                                "with config.json), or a GGUF file's folder with model.gguf_file")
            elif (local is not None and local.is_dir() and not recipe.model.gguf_file
                  and not (local / "config.json").is_file()):
                problems.append(f"model.path: '{recipe.model.path}' has no config.json, so it is not a "
                                "transformers model folder; give the folder from_pretrained/save_pretrained uses")
    return problems


def _slurm_problems(recipe: Recipe) -> list[str]:
    """The job's allocation and the Ray workers must agree: Slurm would otherwise hold GPUs the
    workers never use (a recipe of CPU workers under --gpus-per-node), or the workers would
    wait for resources the job does not have."""
    sl, cl = recipe.slurm, recipe.cluster
    if sl is None:
        return []
    gpus = sl.nodes * sl.gpus_per_node
    if gpus and cl.gpus_per_worker == 0:
        return [f"slurm asks for {gpus} GPUs ({sl.nodes} nodes x {sl.gpus_per_node}) but cluster.gpus_per_worker is "
                f"0, so the workers would train on CPU and the GPUs sit idle; set cluster.gpus_per_worker: 1 and "
                f"cluster.workers: {gpus}, or slurm.gpus_per_node: 0"]
    if cl.gpus_per_worker and not gpus:
        return [f"cluster.gpus_per_worker is {cl.gpus_per_worker:g} but slurm.gpus_per_node is 0: the job would get "
                "no GPUs; set slurm.gpus_per_node to the GPUs each node has"]
    problems = []
    if gpus and cl.workers * cl.gpus_per_worker != gpus:
        fix = f"set cluster.workers: {gpus}"  # one GPU per worker
        problems.append(f"cluster.workers x gpus_per_worker = {cl.workers * cl.gpus_per_worker:g} GPUs, but the Slurm "
                        f"job holds {gpus} ({sl.nodes} nodes x {sl.gpus_per_node}); {fix}, or change slurm.nodes or "
                        "slurm.gpus_per_node")
    if cl.cpus_per_worker > sl.cpus_per_node or cl.workers * cl.cpus_per_worker > sl.nodes * sl.cpus_per_node:
        problems.append(f"cluster.workers x cpus_per_worker = {cl.workers * cl.cpus_per_worker:g} CPUs "
                        f"({cl.cpus_per_worker:g} each), but the Slurm job has {sl.nodes} nodes x "
                        f"{sl.cpus_per_node} CPUs; raise slurm.cpus_per_node or slurm.nodes, or lower the workers")
    return problems


def _check_exists(field: str, spec: str, *, want_dir: bool) -> list[str]:
    try:
        path = resolve_local(spec)
    except RecipeError as exc:
        return [f"{field}: {exc.problems[0]}"]
    if path is None or not path.exists():
        return [f"{field}: '{spec}' does not exist (relative paths are read from the current "
                f"directory, {Path.cwd()})"]
    if want_dir and not path.is_dir():
        return [f"{field}: format textdir needs a folder with one sub-folder per label; '{spec}' is a file"]
    if not want_dir and path.is_dir():
        return [f"{field}: '{spec}' is a folder; name a file, or set format: textdir"]
    return []

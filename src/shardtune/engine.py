"""The per-worker training loop: one file, top to bottom.

Each worker: read the recipe -> load backbone, task head and adapter -> read and
tokenise the data, take its shard -> wrap it all in a DeepSpeed engine -> evaluate,
train, evaluate each epoch -> checkpoint -> save the adapter.

Ray is not imported here. The loop talks to its launcher through a `Reporter`
(orchestrate.py has the Ray one); `python -m shardtune.engine RECIPE` runs the same
loop under torchrun or the DeepSpeed launcher, for debugging and GPU benchmarks.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from shardtune import backbone, export, quantization
from shardtune.adapters import apply_adapter, is_peft, optimizer_groups
from shardtune.data import few_shot, read_rows, sample, split_train_validation
from shardtune.errors import DataError, RecipeError
from shardtune.recipe import Recipe
from shardtune.sharding import deepspeed_config, prepare_deepspeed
from shardtune.tasks import get_task

CHECKPOINT_TAG = "state"  # DeepSpeed checkpoint folder inside a reported checkpoint
EXPORT_DIR = "export"     # the finished run's files inside the final checkpoint
STOP_FILE = "STOP"        # created by the launcher to ask the workers to checkpoint and stop


class Reporter(Protocol):
    """How the loop talks to whatever launched it. Every rank calls report() equally often."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...

    def stop_requested(self) -> bool:
        """True once the launcher was asked to stop (SIGTERM, Slurm's warning signal)."""
        ...

    def node(self) -> str:
        """The node this worker runs on (for the run summary)."""
        ...


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    train_rows: list
    val_rows: list
    train_examples: list
    val_examples: list
    skipped: dict  # split -> bad rows left out (data.on_bad_row: skip)
    problems: list  # the first few of those rows' problems, for the log


def load_data(recipe: Recipe, task, tokenizer, *, encode: bool = True) -> Data:
    """Read, split, sample and tokenise, and fix the task's labels from the training rows.
    Same result on every rank (all seeded). encode=False: the rows only (zero-shot
    inference tokenises just what it scores)."""
    skip = recipe.data.on_bad_row == "skip"
    bad_train: list[str] | None = [] if skip else None
    bad_val: list[str] | None = [] if skip else None
    train_rows = read_rows(recipe.data.train, bad_train)
    if recipe.data.validation is not None:
        val_rows = read_rows(recipe.data.validation, bad_val)
    else:
        train_rows, val_rows = split_train_validation(train_rows, recipe.data.validation_split,
                                                      recipe.train.seed)
    if recipe.data.few_shot_per_class:
        train_rows = few_shot(train_rows, recipe.data.few_shot_per_class, task.row_label, recipe.train.seed)
    train_rows = sample(train_rows, recipe.data.max_train_examples, recipe.train.seed)
    val_rows = sample(val_rows, recipe.data.max_eval_examples, recipe.train.seed)
    task.fit_labels(train_rows)
    if skip:
        train_rows = drop_bad_rows(train_rows, task, tokenizer, bad_train, recipe.data.train.path)
        val_rows = drop_bad_rows(val_rows, task, tokenizer, bad_val,
                                 (recipe.data.validation or recipe.data.train).path)
    skipped = {"train": len(bad_train or []), "validation": len(bad_val or [])}
    examples = [task.encode(rows, tokenizer) if encode else [] for rows in (train_rows, val_rows)]
    return Data(train_rows, val_rows, *examples, skipped, ((bad_train or []) + (bad_val or []))[:5])


def drop_bad_rows(rows: list, task, tokenizer, bad: list[str], path: str, with_targets: bool = True) -> list:
    """The rows that encode on their own; the others' problems go to `bad`. A file that is
    mostly bad is not what the recipe says it is: that stays an error."""
    good = []
    for row in rows:
        try:
            task.encode([row], tokenizer, with_targets=with_targets)
            good.append(row)
        except DataError as exc:
            bad.append(str(exc))
    if not good or len(bad) > len(good):
        raise DataError([f"'{path}': {len(bad)} of {len(bad) + len(good)} rows do not fit the task, so the file is "
                         "probably not the format or columns the recipe says; the first problems:", *bad[:3]])
    return good


def augmented_examples(recipe: Recipe, task, tokenizer, train_rows, epoch: int):
    """This epoch's training examples with a fresh, seeded draw of augmentations."""
    from shardtune.data.augment import Augmenter

    augmenter = Augmenter(recipe.data.augment, seed=recipe.train.seed * 100_003 + epoch)
    rows = [task.augment(row, augmenter) if augmenter.should_augment() else row for row in train_rows]
    return task.encode(rows, tokenizer)


def epoch_micro_batches(n_examples: int, world: int, rank: int, micro: int, accum: int,
                        seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches (example indices) for one epoch.

    Every rank gets the same number of micro-batches, a multiple of the accumulation
    steps: ZeRO's collectives hang if one rank steps more often than another.
    """
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = n_examples // world
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    n_micro = (math.ceil(per_rank / micro) // accum) * accum
    return [mine[i * micro:(i + 1) * micro] for i in range(n_micro)]


def optimizer_steps_per_epoch(n_examples: int, world: int, train) -> int:
    micro = len(epoch_micro_batches(n_examples, world, 0, train.micro_batch_size,
                                    train.gradient_accumulation_steps, train.seed, 0))
    steps = micro // train.gradient_accumulation_steps
    if steps == 0:
        raise DataError(f"{n_examples} training examples are too few for one optimizer step "
                        f"with {world} workers x micro_batch_size {train.micro_batch_size} x "
                        f"gradient_accumulation_steps {train.gradient_accumulation_steps}; lower those")
    return steps


def eval_shard(n_examples: int, world: int, rank: int) -> list[int]:
    """Strided shard, padded with repeats so every rank runs the same number of forwards."""
    mine = list(range(rank, n_examples, world))
    per_rank = math.ceil(n_examples / world)
    return mine + [mine[-1] if mine else 0] * (per_rank - len(mine))


# ---------------------------------------------------------------------- the loop
def train_worker(recipe_dict: dict, reporter: Reporter) -> None:
    recipe = Recipe.model_validate(recipe_dict)
    tr, sh = recipe.train, recipe.sharding
    started = time.perf_counter()

    # Distributed set-up. Ray (or torchrun) already set RANK/WORLD_SIZE/MASTER_*.
    prepare_deepspeed()
    import deepspeed

    use_gpu = recipe.cluster.gpus_per_worker > 0 and torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(recipe.cluster.cpus_per_worker)))
    is_main = rank == 0
    work_dir = Path(tempfile.mkdtemp(prefix=f"shardtune-rank{rank}-"))
    log = RunLog(work_dir / EXPORT_DIR / "logs", enabled=is_main)

    # Model: backbone + task head + adapter. Seed first so every rank builds the same
    # head and adapter initialisation.
    torch.manual_seed(tr.seed)
    task = get_task(recipe)
    tokenizer = backbone.load_tokenizer(recipe)
    data = load_data(recipe, task, tokenizer)
    train_rows, train_examples, val_examples = data.train_rows, data.train_examples, data.val_examples
    if sum(data.skipped.values()):
        log(f"skipped bad rows (data.on_bad_row: skip): {data.skipped['train']} train, "
            f"{data.skipped['validation']} validation; first: " + " | ".join(data.problems))
    model = backbone.load_model(recipe, task, tokenizer)
    if hasattr(task, "fit_verbalizer"):  # prompt tasks: label words found from the untrained model
        task.fit_verbalizer(model, tokenizer, train_examples, device, rank, world, log)
    model = apply_adapter(model, recipe, task)
    if hasattr(task, "wrap"):  # prompt tasks: read the LM at the label slot, with the soft tokens
        model = task.wrap(model, tokenizer)
    trainable, total = backbone.count_parameters(model)
    log(f"model ready: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%); {len(train_examples)} train / {len(val_examples)} "
        f"validation examples; {world} workers, ZeRO-{sh.zero_stage}, {sh.precision}")

    # Schedule: optimizer steps per epoch follow from the shard sizes.
    steps_per_epoch = optimizer_steps_per_epoch(len(train_examples), world, tr)
    total_steps = tr.max_steps or tr.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = tr.warmup_steps if tr.warmup_steps is not None else round(tr.warmup_ratio * total_steps)

    # AdamW (a torch optimizer, so DeepSpeed compiles nothing; see sharding.deepspeed_config)
    # over the adapter's parameter groups.
    optimizer = torch.optim.AdamW(optimizer_groups(model, recipe), lr=tr.learning_rate, betas=tr.adam_betas)
    from transformers import get_scheduler

    scheduler = get_scheduler(tr.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    if not quantization.is_quantized(recipe):  # quantised weights were placed when loaded
        model = model.to(device)
    elif hasattr(model, "place_own"):  # a prompt model's soft tokens and word tables, not the LM
        model.place_own(device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=deepspeed_config(recipe, world))

    # Resume: Ray hands back the last reported checkpoint after a worker failure, or the
    # stop checkpoint of a run continued with `shardtune run --resume`.
    history: list[dict] = []
    start_epoch, resume_micro, resume_rank_state = 0, 0, None
    resume_dir = reporter.latest_checkpoint()
    if resume_dir and (Path(resume_dir) / CHECKPOINT_TAG).is_dir():
        _, client_state = engine.load_checkpoint(resume_dir, tag=CHECKPOINT_TAG, load_module_strict=False)
        start_epoch, history = client_state["epoch"], client_state["history"]
        resume_micro = client_state.get("micro_batches_done", 0)
        if resume_micro:  # stopped mid-epoch: this rank's RNG and running loss come back too
            resume_rank_state = torch.load(Path(resume_dir) / f"rank-{rank}.pt", weights_only=False)
        log(f"resumed from the checkpoint after epoch {start_epoch}"
            f"{f' and {resume_micro} micro-batches' if resume_micro else ''} (step {engine.global_steps})")

    def evaluate(epoch: float, **extra) -> dict:
        indices = eval_shard(len(val_examples), world, rank)
        outputs = export.forward_outputs(engine.module, task, tokenizer, [val_examples[i] for i in indices],
                                         tr.eval_batch_size or 2 * tr.micro_batch_size, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, (indices, outputs))
        by_index = {i: out for idx, outs in gathered for i, out in zip(idx, outs)}
        ordered = [by_index[i] for i in range(len(val_examples))]
        metrics = {"epoch": round(epoch, 4), "step": engine.global_steps, **task.metrics(ordered, val_examples),
                   **extra}
        history.append(metrics)
        log.scalars("validation", metrics, engine.global_steps)
        log("validation " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("epoch", "step"))
            + f" (epoch {epoch:g}, step {engine.global_steps})")
        return metrics

    if tr.eval_before_training and not history:
        reporter.report(evaluate(0), None)

    # Train.
    step_times: list[float] = []
    time_to_first_step = None
    for epoch in range(start_epoch, epochs):
        # Dropout draws from torch's global generator. Seeding it from (seed, epoch, rank)
        # makes a resumed epoch bit-identical to an uninterrupted one without saving
        # generator states, and gives each rank its own dropout masks.
        torch.manual_seed(tr.seed + 7919 * (epoch + 1) + rank)
        if recipe.data.augment is not None:
            train_examples = augmented_examples(recipe, task, tokenizer, train_rows, epoch)
        engine.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of example losses, examples)
        skip = resume_micro if epoch == start_epoch else 0
        if skip:
            torch.set_rng_state(resume_rank_state["rng"])
            loss_sum = resume_rank_state["loss_sum"]
        step_started = time.perf_counter()
        for n, micro in enumerate(epoch_micro_batches(len(train_examples), world, rank, tr.micro_batch_size,
                                                      tr.gradient_accumulation_steps, tr.seed, epoch)):
            if n < skip:
                continue  # done before the stop; the order of an epoch is fixed by its seed
            batch = task.collate([train_examples[i] for i in micro], tokenizer)
            loss = engine(**{k: v.to(device) for k, v in batch.items()}).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            loss_sum += torch.tensor([loss.item() * len(micro), len(micro)], dtype=torch.float64)
            if not boundary:
                continue

            now = time.perf_counter()
            step_times.append(now - step_started)
            step_started = now
            if time_to_first_step is None:
                time_to_first_step = now - started
            step = engine.global_steps
            if step % tr.log_every_steps == 0 or step == total_steps:
                lr = engine.get_lr()[0]
                eta = statistics.median(step_times[-20:]) * (total_steps - step)
                log(f"epoch {epoch + 1}/{epochs} step {step}/{total_steps} loss {loss.item():.4f} "
                    f"lr {lr:.2e} {step_times[-1]:.2f}s/step eta {_duration(eta)}")
                log.scalars("train", {"loss": loss.item(), "lr": lr}, step)
            if tr.eval_every_steps and step % tr.eval_every_steps == 0 and step != total_steps:
                reporter.report(evaluate(step / steps_per_epoch), None)
            if step >= total_steps:
                break
            if _stop_agreed(reporter, device):
                # Asked to stop (SIGTERM, Slurm's warning): checkpoint where we are, so that
                # `shardtune run --resume` continues from this step.
                checkpoint = work_dir / f"checkpoint-stop-{step}"
                engine.save_checkpoint(str(checkpoint), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True,
                                       client_state={"epoch": epoch, "micro_batches_done": n + 1, "history": history})
                torch.save({"rng": torch.get_rng_state(), "loss_sum": loss_sum}, checkpoint / f"rank-{rank}.pt")
                log(f"stop requested: saved a checkpoint at step {step}/{total_steps}; resume with "
                    "`shardtune run RECIPE --resume`")
                reporter.report({"stopped": True, "step": step, "total_steps": total_steps}, str(checkpoint))
                log.close()
                return

        # End of epoch: evaluate and checkpoint everything (adapter, optimizer, schedule).
        dist.all_reduce(loss_sum)
        metrics = evaluate(engine.global_steps / steps_per_epoch, train_loss=float(loss_sum[0] / max(loss_sum[1], 1)))
        checkpoint = work_dir / f"checkpoint-{epoch + 1}"
        engine.save_checkpoint(str(checkpoint), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True,
                               client_state={"epoch": epoch + 1, "history": history})
        reporter.report(metrics, str(checkpoint))
        shutil.rmtree(checkpoint, ignore_errors=True)  # the reporter has its own copy now
        if engine.global_steps >= total_steps:
            break

    # Save the run's files (rank 0) and hand them over with the final report.
    out = work_dir / EXPORT_DIR
    export.save_trained(engine.module, out, is_peft=is_peft(recipe), zero_stage=sh.zero_stage, is_main=is_main)
    peak = _peak_memory_mb(device)
    peaks, nodes = [None] * world, [None] * world
    dist.all_gather_object(peaks, peak)
    dist.all_gather_object(nodes, reporter.node())
    steady = step_times[3:] or step_times
    summary = {
        "trainable_parameters": trainable, "total_parameters": total,
        "train_examples": len(train_examples), "validation_examples": len(val_examples),
        "skipped_rows": data.skipped, "steps": engine.global_steps, "epochs": epochs, "workers": world,
        "worker_seconds": round(time.perf_counter() - started, 2),
        "time_to_first_step_s": round(time_to_first_step or 0.0, 2),
        "steady_step_s": round(statistics.median(steady), 4) if steady else None,
        "peak_memory_mb_per_worker": peaks, "worker_nodes": nodes,
    }
    if is_main:
        tokenizer.save_pretrained(out / "tokenizer")
        (out / export.TASK_STATE).write_text(json.dumps(task.state(), indent=2))
        (out / "history.json").write_text(json.dumps({"history": history, "summary": summary}, indent=2))
        log(f"done: {engine.global_steps} steps in {_duration(summary['worker_seconds'])}")
        log.close()
    reporter.report({**history[-1], "final": True, **summary}, str(out) if is_main else None)
    dist.barrier()
    shutil.rmtree(work_dir, ignore_errors=True)


# --------------------------------------------------------------------------- helpers
class RunLog:
    """Progress lines to stdout and logs/train.log, and scalars to TensorBoard (rank 0 only)."""

    def __init__(self, directory: Path, enabled: bool):
        self.enabled = enabled
        self.file = self.writer = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            self.file = open(directory / "train.log", "a", buffering=1)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory / "tensorboard"))

    def __call__(self, message: str) -> None:
        if self.enabled:
            line = f"[shardtune {time.strftime('%H:%M:%S')}] {message}"
            # sys.stdout directly: Ray Train patches print() and would emit every line twice.
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            self.file.write(line + "\n")

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.enabled:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.file.close()


def _stop_agreed(reporter, device: torch.device) -> bool:
    """Every rank stops at the same step if any rank saw the request."""
    flag = torch.tensor([1.0 if reporter.stop_requested() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ------------------------------------------------------------------ without Ray
class LocalReporter:
    """For torchrun: epoch checkpoints go to OUTPUT/checkpoint, the finished run to OUTPUT.

    Ranks share a file system here (one machine, or a shared output directory).
    """

    def __init__(self, output_dir: Path):
        import signal

        self.output_dir = output_dir
        self._signalled = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):  # torchrun forwards SIGTERM to its workers
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def stop_requested(self) -> bool:
        return self._signalled or (self.output_dir / STOP_FILE).exists()

    def node(self) -> str:
        import socket

        return socket.gethostname()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            final = bool(metrics.get("final"))
            target = self.output_dir if final else self.output_dir / "checkpoint"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
        dist.barrier()

    def latest_checkpoint(self) -> str | None:
        path = self.output_dir / "checkpoint"
        return str(path) if (path / CHECKPOINT_TAG).is_dir() else None


def main(argv: list[str] | None = None) -> int:
    """torchrun --nproc-per-node N -m shardtune.engine RECIPE [key=value ...]

    The worker loop without Ray, for debugging and GPU profiling. Writes the same run
    directory as `shardtune run`; re-running resumes from OUTPUT/checkpoint.
    """
    from shardtune.export import write_metrics
    from shardtune.recipe import load_recipe

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    started = time.perf_counter()
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except RecipeError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    output = Path(recipe.output.dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / STOP_FILE).unlink(missing_ok=True)  # a request from an earlier attempt is spent
    reporter = LocalReporter(output)
    train_worker(recipe.model_dump(mode="json"), reporter)
    if not (output / "history.json").exists():  # stopped: the checkpoint is in OUTPUT/checkpoint
        if dist.get_rank() == 0:
            print(f"stopped; run the same command again to resume from {output / 'checkpoint'}", file=sys.stderr)
        dist.destroy_process_group()
        return 3
    if dist.get_rank() == 0:
        (output / "recipe.yaml").write_text(recipe.to_yaml())
        write_metrics(output, recipe, time.perf_counter() - started)
        if not recipe.output.keep_checkpoints:
            shutil.rmtree(output / "checkpoint", ignore_errors=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

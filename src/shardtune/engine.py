"""The per-worker training loop, in three parts read top to bottom:

  setup   distributed, model (backbone + head + adapter), data, DeepSpeed engine, resume
  fit     the step loop: evaluation, checkpoints, a stop at the next step when asked
  finish  save the run's files and hand them over with the final report

and `train_worker`, which runs them and always removes the worker's scratch folder.

Ray is not imported here. The loop talks to its launcher through a `Reporter`
(orchestrate.py has the Ray one); `torchrun -m shardtune.torchrun RECIPE` runs the same
loop under torchrun (torchrun.py), for debugging and GPU benchmarks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from shardtune import backbone, checkpoint, devices, export, inference, quantization, rundir, telemetry
from shardtune.adapters import apply_adapter, is_peft, optimizer_groups
from shardtune.data.pipeline import (augmented_examples, collated_batches, epoch_micro_batches, eval_shard,
                                     load_data, optimizer_steps_per_epoch)
from shardtune.errors import RecipeError, RunError
from shardtune.recipe import Recipe
from shardtune.reports import Report
from shardtune.partitions import (gathered_for_forward, held_numel, is_partitioned, largest_trainable, partitioned,
                                  live_parameters)
from shardtune.sharding import deepspeed_config, partitioned_loading, prepare_deepspeed
from shardtune.tasks import Can, get_task, kind_of
from shardtune.tracking import RunLog

EXPORT_DIR = "export"     # the finished run's files inside the final checkpoint
SCRATCH_PREFIX = "shardtune-rank"


class Reporter(Protocol):
    """How the loop talks to whatever launched it. Every rank calls report() equally often."""

    def report(self, report: Report, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self, scratch: Path) -> str | None:
        """The checkpoint to resume from (or None); `scratch` is this worker's own folder, for
        launchers that must download it first."""
        ...

    def stop_requested(self) -> bool:
        """True once the launcher was asked to stop (SIGTERM, SIGINT, Slurm's warning signal)."""
        ...

    def node(self) -> str:
        """The node this worker runs on (for the run summary)."""
        ...

    def device(self) -> torch.device | None:
        """The GPU the launcher gave this worker (Ray's get_device()), or None to use LOCAL_RANK."""
        ...


@dataclass
class Worker:
    """What setup builds and fit and finish use."""
    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    work_dir: Path
    log: RunLog
    task: object
    tokenizer: object
    data: object
    engine: object = None
    trainable: int = 0
    total: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    epochs: int = 0
    started: float = 0.0
    fingerprint: str = ""
    history: list = field(default_factory=list)     # every evaluation's metrics
    steps: list = field(default_factory=list)       # every logged step: loss, lr, tokens/s (the report's curves)
    start_epoch: int = 0
    resume_micro: int = 0
    resume_tensors: dict = field(default_factory=dict)
    step_times: list = field(default_factory=list)
    step_work: list = field(default_factory=list)   # (tokens processed, supervised, FLOPs) per optimizer step
    time_to_first_step: float | None = None
    shape: telemetry.ModelShape | None = None
    load_peak: dict = field(default_factory=dict)
    held: int = 0   # parameter elements this rank holds after loading (its partition under ZeRO-3)


def train_worker(recipe_dict: dict, reporter: Reporter) -> None:
    recipe = Recipe.model_validate(recipe_dict)
    started = time.perf_counter()
    rank, world, device = setup_distributed(recipe, reporter)
    work_dir = scratch_dir(rank)
    log = RunLog(work_dir / EXPORT_DIR / rundir.LOGS, enabled=rank == 0, recipe=recipe)
    status = "failed"
    try:
        worker = setup(recipe, reporter, rank, world, device, work_dir, log, started)
        if fit(worker, reporter):
            finish(worker, reporter)
            status = "finished"
        else:
            status = "stopped"
    finally:
        log.close(status)
        shutil.rmtree(work_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- setup
def setup_distributed(recipe: Recipe, reporter: Reporter) -> tuple[int, int, torch.device]:
    """Ray (or torchrun) already set RANK/WORLD_SIZE/MASTER_*; Ray also started the group."""
    device = devices.worker_device(recipe, reporter.device())
    devices.configure(device, recipe)
    prepare_deepspeed()
    import deepspeed

    # Also when Ray started the process group: DeepSpeed then wraps it, and zero.Init (ZeRO-3
    # loading, before deepspeed.initialize) needs DeepSpeed's view of the world size.
    deepspeed.init_distributed(dist_backend=devices.backend(device))
    return dist.get_rank(), dist.get_world_size(), device


def setup(recipe: Recipe, reporter: Reporter, rank: int, world: int, device: torch.device, work_dir: Path,
          log: RunLog, started: float) -> Worker:
    tr, sh = recipe.train, recipe.sharding
    # Seed first so every rank builds the same head and adapter initialisation.
    torch.manual_seed(tr.seed)
    task = get_task(recipe)
    tokenizer = backbone.load_tokenizer(recipe)
    data = load_data(recipe, task, tokenizer)
    w = Worker(recipe, rank, world, device, work_dir, log, task, tokenizer, data, started=started,
               fingerprint=checkpoint.fingerprint(recipe.model_dump(mode="json")))
    if sum(data.skipped.values()):
        log(f"skipped bad rows (data.on_bad_row: skip): {data.skipped['train']} train, "
            f"{data.skipped['validation']} validation; first: " + " | ".join(data.problems))
    with partitioned_loading(recipe, world):  # ZeRO-3: each rank holds only its partition from the start
        model = build_model(w)
        w.trainable, w.total = backbone.count_parameters(model)
        w.held = held_numel(model)
        w.shape = telemetry.ModelShape.of(model)
        w.load_peak = telemetry.peak_memory_mb(device)
        log(f"model ready: {w.trainable:,} trainable of {w.total:,} parameters "
            f"({100 * w.trainable / w.total:.2f}%); {len(data.train_examples)} train / {len(data.val_examples)} "
            f"validation examples; {world} workers on {device.type}, ZeRO-{sh.zero_stage}, {sh.precision}")

        # Schedule: optimizer steps per epoch follow from the shard sizes.
        w.steps_per_epoch = optimizer_steps_per_epoch(len(data.train_examples), world, tr)
        w.total_steps = tr.max_steps or tr.epochs * w.steps_per_epoch
        w.epochs = math.ceil(w.total_steps / w.steps_per_epoch)
        w.engine = build_engine(w, model)
    telemetry.release_host_memory()
    telemetry.reset_peak_memory(device)  # the training peak, apart from the loading peak
    resume(w, reporter.latest_checkpoint(work_dir))
    return w


def build_model(w: Worker) -> torch.nn.Module:
    """Backbone + head (+ label words) + adapter (+ the prompt model around it)."""
    recipe, task = w.recipe, w.task
    model = backbone.load_model(recipe, task, w.tokenizer)
    kind = kind_of(recipe)
    if kind.can(Can.FIT_ON_MODEL):  # prompt tasks: label words found from the untrained model
        with gathered_for_forward(model):
            task.fit_verbalizer(model, w.tokenizer, w.data.train_examples, w.device, w.rank, w.world, w.log)
    if recipe.train.gradient_checkpointing:
        backbone.enable_gradient_checkpointing(model)
    model = apply_adapter(model, recipe, task)
    if kind.can(Can.WRAP_MODEL):  # prompt tasks: read the LM at the label slot, with the soft tokens
        model = task.wrap(model, w.tokenizer)
    return model


def build_engine(w: Worker, model: torch.nn.Module):
    """AdamW (a torch optimizer, so DeepSpeed compiles nothing; see sharding.deepspeed_config)
    over the adapter's parameter groups, the schedule, and the DeepSpeed engine."""
    tr = w.recipe.train
    warmup = tr.warmup_steps if tr.warmup_steps is not None else round(tr.warmup_ratio * w.total_steps)
    optimizer = torch.optim.AdamW(optimizer_groups(model, w.recipe), lr=tr.learning_rate, betas=tr.adam_betas)
    from transformers import get_scheduler

    scheduler = get_scheduler(tr.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=w.total_steps)
    if is_partitioned(model):
        # DeepSpeed places the partitions and converts the parameters made after zero.Init
        # (adapter, head), but flattens the trainable ones into one buffer of one dtype, and
        # does not cast them as it casts the module at stages 0-2: peft keeps adapter weights
        # in fp32 while a new head has the backbone's dtype. So cast them to the training dtype.
        dtype = getattr(torch, quantization.PRECISION_DTYPES[w.recipe.sharding.precision])
        for param in model.parameters():
            if not partitioned([param]) and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    elif not quantization.is_quantized(w.recipe):  # quantised weights were placed when loaded
        model = model.to(w.device)
    elif hasattr(model, "place_own"):  # a prompt model's soft tokens and word tables, not the LM
        model.place_own(w.device)
    import deepspeed

    config = deepspeed_config(w.recipe, w.world, on_gpu=w.device.type == "cuda",
                              keep_whole=largest_trainable(model) if is_peft(w.recipe) else 0,
                              live_parameters=live_parameters(w.total, w.shape.layers))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def resume(w: Worker, directory: str | None) -> None:
    """Ray hands back the last reported checkpoint after a worker failure, or the stop
    checkpoint of a run continued with `shardtune run --resume`."""
    if directory is None:
        return
    if not checkpoint.exists(directory):
        if (Path(directory) / checkpoint.DEEPSPEED_TAG).is_dir():
            raise RunError(f"the checkpoint {directory} was written by an earlier shardtune, whose per-rank state "
                           "was a pickle that this version no longer loads; delete the run's .partial folder and "
                           "start afresh")
        return
    state, w.resume_tensors = checkpoint.load(w.engine, Path(directory), w.rank, w.world, w.fingerprint)
    w.start_epoch, w.history, w.steps = state.epoch, state.history, state.steps
    accumulation = w.recipe.train.gradient_accumulation_steps
    # The same optimizer steps done in the epoch, in this world's micro-batches per rank.
    w.resume_micro = state.micro_batches_done // state.accumulation * accumulation
    w.log(f"resumed from the checkpoint after epoch {w.start_epoch}"
          f"{f' and {w.resume_micro} micro-batches' if w.resume_micro else ''} (step {w.engine.global_steps})")
    if state.world != w.world:
        w.log(f"the checkpoint was written by {state.world} workers x {state.accumulation} accumulation steps; "
              f"continuing on {w.world} x {accumulation}, the same global batch of "
              f"{w.engine.train_batch_size()} examples, from its portable state")


# ------------------------------------------------------------------------------- fit
def fit(w: Worker, reporter: Reporter) -> bool:
    """Train to the end (True), or until a stop was asked for and checkpointed (False)."""
    if w.recipe.train.eval_before_training and not w.history:
        reporter.report(Report.evaluation(evaluate(w)), None)
    for epoch in range(w.start_epoch, w.epochs):
        loss_sum = train_epoch(w, reporter, epoch)
        if loss_sum is None:
            return False
        # End of epoch: evaluate and checkpoint everything (adapter, optimizer, schedule).
        dist.all_reduce(loss_sum)
        metrics = evaluate(w, train_loss=float(loss_sum[0] / max(loss_sum[1], 1)))
        saved = save_checkpoint(w, f"checkpoint-{epoch + 1}", epoch + 1, 0, torch.zeros_like(loss_sum))
        reporter.report(Report.evaluation(metrics), str(saved))
        shutil.rmtree(saved, ignore_errors=True)  # the reporter has its own copy now
        if w.engine.global_steps >= w.total_steps:
            break
    return True


def train_epoch(w: Worker, reporter: Reporter, epoch: int) -> torch.Tensor | None:
    """One epoch of optimizer steps; returns (sum of example losses, examples) on the
    training device, or None when it stopped on request after checkpointing."""
    tr, engine = w.recipe.train, w.engine
    # Dropout draws from torch's global generator. Seeding it from (seed, epoch, rank)
    # gives each rank its own masks; a mid-epoch resume restores the generator's state.
    torch.manual_seed(tr.seed + 7919 * (epoch + 1) + w.rank)
    examples = w.data.train_examples
    if w.recipe.data.augment is not None:
        examples = augmented_examples(w.recipe, w.task, w.tokenizer, w.data.train_rows, epoch)
    engine.train()
    # Accumulated on the device without a host sync per micro-step (and NCCL reduces only
    # device tensors).
    loss_sum = torch.zeros(2, dtype=torch.float64, device=w.device)
    skip = w.resume_micro if epoch == w.start_epoch else 0
    if skip:
        if "rng" in w.resume_tensors:  # not when resumed on another world size: the seed above stands
            torch.set_rng_state(w.resume_tensors["rng"])
        loss_sum = w.resume_tensors["loss_sum"].to(w.device)
    step_started = time.perf_counter()
    micro_batches = epoch_micro_batches(len(examples), w.world, w.rank, tr.micro_batch_size,
                                        tr.gradient_accumulation_steps, tr.seed, epoch)
    # The epoch's order is fixed by its seed, so a resume skips what was done before the stop.
    batches = collated_batches(examples, micro_batches[skip:], w.task, w.tokenizer,
                               workers=dataloader_workers(w), pin=w.device.type == "cuda")
    work = [0, 0, 0.0]  # this optimizer step's tokens processed, tokens supervised, FLOPs
    for n, (size, batch) in enumerate(batches, start=skip):
        processed, supervised, sequences, length = telemetry.batch_tokens(batch)
        work = [work[0] + processed, work[1] + supervised, work[2] + w.shape.flops(sequences * length, sequences,
                                                                                  length)]
        loss = engine(**{k: v.to(w.device, non_blocking=True) for k, v in batch.items()}).loss
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        loss_sum += torch.stack([loss.detach().double() * size, loss_sum.new_tensor(size)])
        if not boundary:
            continue
        now = time.perf_counter()
        w.step_times.append(now - step_started)
        w.step_work.append(tuple(work))
        step_started, work = now, [0, 0, 0.0]
        if w.time_to_first_step is None:
            w.time_to_first_step = now - w.started
        step = engine.global_steps
        if step % tr.log_every_steps == 0 or step == w.total_steps:
            log_step(w, step, loss.item())
        if tr.eval_every_steps and step % tr.eval_every_steps == 0 and step != w.total_steps:
            reporter.report(Report.evaluation(evaluate(w)), None)
        if step >= w.total_steps:
            break
        if _stop_agreed(reporter, w.device):
            # Asked to stop (SIGTERM, Ctrl-C, Slurm's warning): checkpoint where we are, so
            # that `shardtune run --resume` continues from this step.
            saved = save_checkpoint(w, f"checkpoint-stop-{step}", epoch, n + 1, loss_sum)
            w.log(f"stop requested: saved a checkpoint at step {step}/{w.total_steps}; resume with "
                  "`shardtune run RECIPE --resume`")
            reporter.report(Report.stopped(w.history[-1] if w.history else {}, step, w.total_steps), str(saved))
            return None
    return loss_sum


def log_step(w: Worker, step: int, loss: float) -> None:
    lr = w.engine.get_lr()[0]
    eta = statistics.median(w.step_times[-20:]) * (w.total_steps - step)
    recent = slice(-min(len(w.step_times), w.recipe.train.log_every_steps), None)
    seconds = sum(w.step_times[recent])
    # This rank's tokens times the world: the run's rate, up to the ranks' padding differences.
    tokens_per_s = sum(t[0] for t in w.step_work[recent]) * w.world / max(seconds, 1e-9)
    # The same epoch figure as the validation lines and metrics.json: epochs done, fractional.
    w.log(f"epoch {epochs_done(w, step):g}/{w.epochs} step {step}/{w.total_steps} loss {loss:.4f} "
          f"lr {lr:.2e} {w.step_times[-1]:.2f}s/step ~{tokens_per_s:,.0f} tok/s eta {_duration(eta)}")
    point = {"step": step, "epoch": epochs_done(w, step), "loss": loss, "lr": lr,
             "tokens_per_s": round(tokens_per_s, 1), "step_s": round(w.step_times[-1], 4)}
    w.steps.append(point)
    w.log.scalars("train", point, step)


def epochs_done(w: Worker, step: int) -> float:
    """Epochs of optimizer steps done at `step`, as the step lines, the validation lines and
    metrics.json all state it (HF Trainer's convention: 1.5 is half-way through the second)."""
    return round(step / w.steps_per_epoch, 2)


def dataloader_workers(w: Worker) -> int:
    setting = w.recipe.train.dataloader_workers
    return setting if setting != "auto" else (2 if w.device.type == "cuda" else 0)


def save_checkpoint(w: Worker, name: str, epoch: int, micro_done: int, loss_sum: torch.Tensor) -> Path:
    """The whole training state, in one place for both the epoch-end and the stop checkpoints."""
    directory = w.work_dir / name
    state = checkpoint.TrainState(epoch=epoch, micro_batches_done=micro_done, history=w.history, steps=w.steps,
                                  seed=w.recipe.train.seed, fingerprint=w.fingerprint, world=w.world,
                                  accumulation=w.recipe.train.gradient_accumulation_steps)
    checkpoint.save(w.engine, directory, state, w.rank,
                    {"rng": torch.get_rng_state(), "loss_sum": loss_sum.detach().cpu()})
    return directory


def evaluate(w: Worker, **extra) -> dict:
    val = w.data.val_examples
    indices = eval_shard(len(val), w.world, w.rank)
    batch_size = w.recipe.train.eval_batch_size or 2 * w.recipe.train.micro_batch_size
    outputs = inference.forward_outputs(w.engine.module, w.task, w.tokenizer, [val[i] for i in indices],
                                     batch_size, w.device)
    # Outputs to rank 0 only (a large model's eval outputs would otherwise sit on every
    # rank), which scores them; the metrics, a few numbers, go back to every rank.
    gathered = [None] * w.world if w.rank == 0 else None
    dist.gather_object((indices, outputs), gathered, dst=0)
    scored = [None]
    if w.rank == 0:
        by_index = {i: out for idx, outs in gathered for i, out in zip(idx, outs)}
        ordered = [by_index[i] for i in range(len(val))]
        scored = [w.task.metrics(ordered, val)]
    dist.broadcast_object_list(scored, src=0)
    epoch = epochs_done(w, w.engine.global_steps)
    metrics = {"epoch": epoch, "step": w.engine.global_steps, **scored[0], **extra}
    best = w.recipe.output.keep_best_by
    if best is not None and best not in metrics:
        raise RecipeError(f"output.keep_best_by: {best!r} is not a metric this task reports; it reports "
                          f"{sorted(k for k in metrics if k not in ('epoch', 'step'))}")
    w.history.append(metrics)
    # The epoch's training loss is a training figure: train/epoch_loss, not validation/.
    w.log.scalars("validation", {k: v for k, v in metrics.items() if k not in extra}, w.engine.global_steps)
    if "train_loss" in extra:
        w.log.scalars("train", {"epoch_loss": extra["train_loss"]}, w.engine.global_steps)
    w.log("validation " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("epoch", "step"))
          + f" (epoch {epoch:g}, step {w.engine.global_steps})")
    return metrics


# ---------------------------------------------------------------------------- finish
def finish(w: Worker, reporter: Reporter) -> None:
    """Save the run's files (rank 0) and hand them over with the final report."""
    out = w.work_dir / EXPORT_DIR
    export.save_trained(w.engine, out, is_peft=is_peft(w.recipe), zero_stage=w.recipe.sharding.zero_stage,
                        is_main=w.rank == 0)
    mine = (telemetry.peak_memory_mb(w.device), w.load_peak, reporter.node(), _throughput(w), w.held)
    everyone = [None] * w.world
    dist.all_gather_object(everyone, mine)
    peaks, loads, nodes, rates, held = zip(*everyone)
    steady = w.step_times[3:] or w.step_times
    flops_per_s = statistics.mean(r["flops_per_s"] for r in rates)
    summary = {
        "trainable_parameters": w.trainable, "total_parameters": w.total,
        "train_examples": len(w.data.train_examples), "validation_examples": len(w.data.val_examples),
        "validation_rows_sha256": w.data.val_rows_sha256,
        "skipped_rows": w.data.skipped, "steps": w.engine.global_steps, "epochs": w.epochs, "workers": w.world,
        "worker_seconds": round(time.perf_counter() - w.started, 2),
        "time_to_first_step_s": round(w.time_to_first_step or 0.0, 2),
        "steady_step_s": round(statistics.median(steady), 4) if steady else None,
        # Steady state (after the first 3 steps), all workers together.
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in rates), 1),
        "supervised_tokens_per_s": round(sum(r["supervised_tokens_per_s"] for r in rates), 1),
        "flops_per_s_per_worker": round(flops_per_s, 1),
        "mfu": telemetry.mfu(flops_per_s, w.device),
        "mfu_peak_tflops": telemetry.peak_tflops(w.device),
        # Training peak (after the engine was built); loading's peak apart.
        "peak_memory_mb_per_worker": [telemetry.headline_mb(p) for p in peaks],
        "load_peak_memory_mb_per_worker": [telemetry.headline_mb(p) for p in loads],
        "peak_memory_detail_mb_per_worker": list(peaks), "worker_nodes": list(nodes),
        "parameters_held_per_worker": list(held),
    }
    if w.rank == 0:
        w.tokenizer.save_pretrained(out / rundir.TOKENIZER)
        (out / rundir.TASK_STATE).write_text(json.dumps(w.task.state(), indent=2))
        (out / rundir.HISTORY).write_text(json.dumps({"history": w.history, "steps": w.steps, "summary": summary},
                                                     indent=2))
        w.log(f"done: {w.engine.global_steps} steps in {_duration(summary['worker_seconds'])}")
        w.log.close("finished")  # flushes TensorBoard's events before the reporter copies logs/
    reporter.report(Report.final(w.history[-1], summary), str(out) if w.rank == 0 else None)
    dist.barrier()


# --------------------------------------------------------------------------- helpers
def scratch_dir(rank: int) -> Path:
    """This worker's node-local scratch folder (checkpoints before the reporter copies them).

    Its name carries the worker's PID, so a folder left by a killed worker (no `finally`
    runs after SIGKILL) is removed by the next worker that starts on the node."""
    root = Path(tempfile.gettempdir())
    for stale in root.glob(f"{SCRATCH_PREFIX}*-pid*-*"):
        try:
            pid = int(stale.name.split("-pid", 1)[1].split("-", 1)[0])
            if stale.stat().st_uid == os.getuid() and not _alive(pid):
                shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, OSError):
            continue
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{rank}-pid{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_agreed(reporter, device: torch.device) -> bool:
    """Every rank stops at the same step if any rank saw the request."""
    flag = torch.tensor([1.0 if reporter.stop_requested() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _throughput(w: Worker) -> dict:
    """This rank's steady-state rates (the first 3 steps hold compilation and warm-up)."""
    times, work = (w.step_times[3:], w.step_work[3:]) if len(w.step_times) > 3 else (w.step_times, w.step_work)
    seconds = max(sum(times), 1e-9)
    return {"tokens_per_s": sum(t[0] for t in work) / seconds,
            "supervised_tokens_per_s": sum(t[1] for t in work) / seconds,
            "flops_per_s": sum(t[2] for t in work) / seconds}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

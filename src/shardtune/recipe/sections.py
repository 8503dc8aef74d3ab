"""The recipe's sections as a typed schema (pydantic): what a user may write, with each
field's meaning (the error messages quote it). Unknown keys are errors; the adapter and
task sections are unions keyed by `method` and `type`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, field_validator, model_validator

import shardtune.tasks  # noqa: F401  (each task module registers itself)
from shardtune.adapters.registry import adapter_families
from shardtune.data.schema import DATA_FORMATS, AugmentSection, DataSection, DataSource  # noqa: F401 (re-exported)
from shardtune.quantization import PRECISION_DTYPES
from shardtune.schema import Beta, Section
from shardtune.tasks.registry import task_kinds
from shardtune.tracking import TRACKERS


# --------------------------------------------------------------------------- model
class ModelSection(Section):
    path: str = Field(description="hub id, local directory, or package:NAME/PATH of an installed package")
    gguf_file: str | None = Field(None, description="GGUF file inside `path` to load and dequantise")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the backbone weights are loaded in; auto: the training precision's "
                            "(sharding.precision), so a bf16 run never holds an fp32 copy of the backbone")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="attention kernel; auto: flash_attention_2 on GPUs where flash-attn is installed and "
                            "the model supports it, else transformers' default (sdpa where supported)")


class QuantizationSection(Section):
    mode: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none", description="bitsandbytes quantisation of the frozen backbone: 4-bit nf4/fp4 or 8-bit int8")
    double_quant: bool = Field(False, description="4-bit: also quantise the quantisation constants (QLoRA)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit: dtype of the matmuls; default: model.dtype")
    storage_dtype: Literal["uint8", "float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit: dtype the packed weights are stored in; default: uint8, or the compute "
                          "dtype under ZeRO-3 (which partitions every weight and needs a float dtype)")


# ------------------------------------------------------------------------- adapter
# Each family's section lives beside it in adapters/ and registers itself there.
ADAPTER_METHODS = [family.method for family in adapter_families()]
ADAPTER_SECTIONS = {family.method: family.section for family in adapter_families()}


def _adapter_method(value) -> str:
    if isinstance(value, dict):
        return value.get("method", "lora")
    return getattr(value, "method", "lora")


AdapterSection = Annotated[
    Union[tuple(Annotated[family.section, Tag(family.method)] for family in adapter_families())],
    Discriminator(_adapter_method, custom_error_type="adapter_method",
                  custom_error_message="unknown adapter method")]


# ---------------------------------------------------------------------------- task
# Each task's section lives beside it in tasks/ and registers itself there.
TASK_TYPES = [kind.type for kind in task_kinds()]
TASK_SECTIONS = {kind.type: kind.section for kind in task_kinds()}
TaskSection = Annotated[Union[tuple(kind.section for kind in task_kinds())], Field(discriminator="type")]


# --------------------------------------------------------------------------- train
class TrainSection(Section):
    epochs: int = Field(3, ge=1, le=10_000, description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    micro_batch_size: int = Field(16, ge=1, le=65_536, description="examples per worker per forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65_536, description="micro-batches per optimizer step")
    eval_batch_size: int | None = Field(None, ge=1, le=65_536,
                                        description="examples per worker per eval pass; default 2x micro")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="peak AdamW learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="decay after warm-up")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps spent warming up")
    warmup_steps: int | None = Field(None, ge=0, description="warm-up steps (overrides warmup_ratio)")
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW decoupled weight decay (not on biases/norms)")
    adam_betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 turns clipping off")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="seeds data order, splits and adapter initialisation")
    eval_every_steps: int | None = Field(None, ge=1, description="also evaluate every N optimizer steps")
    log_every_steps: int = Field(10, ge=1, description="print progress every N optimizer steps")
    eval_before_training: bool = Field(True, description="evaluate once before the first step (the baseline)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass instead of keeping them: "
                           "activation memory of one layer instead of all, for ~30% more compute")
    dataloader_workers: int | Literal["auto"] = Field(
        "auto", description="processes that collate batches while the model computes; auto: 2 on GPU, 0 on CPU "
                            "(where they would take the cores the training needs)")


# ------------------------------------------------------------------------ sharding
class ShardingSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="keep optimizer state in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="keep parameters in CPU memory (ZeRO 3)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training precision; auto: bf16 on GPU workers, fp32 on CPU")


# ------------------------------------------------------------------------- cluster
class ClusterSection(Section):
    workers: int = Field(2, ge=1, le=4096, description="training processes (one per GPU, or per CPU slot)")
    cpus_per_worker: float = Field(1, gt=0, le=1024, description="CPUs reserved per worker")
    gpus_per_worker: Literal[0, 1] = Field(0, description="GPUs per worker: 1 (one process per GPU) or 0 to train "
                                                          "on CPU")
    address: str | None = Field(None, description="Ray cluster to attach to (ray://host:port or auto); "
                                                  "default: start an embedded one")
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint")
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field(
        "pack", description="how workers are placed on nodes: pack fills a node first; spread puts them on "
                            "different nodes where it can (strict_*: must)")
    shared_storage: bool = Field(
        False, description="declare output.dir shared by every node although it is on a local file system type "
                           "(e.g. all nodes on one machine); multi-node runs otherwise refuse node-local paths")


class SlurmSection(Section):
    """What `shardtune slurm RECIPE` puts in the sbatch script's #SBATCH lines."""
    nodes: int = Field(1, ge=1, description="nodes to allocate (one Ray node each)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (#SBATCH --gpus-per-node)")
    cpus_per_node: int = Field(4, ge=1, description="CPUs per node (#SBATCH --cpus-per-task)")
    memory: str | None = Field(None, description="memory per node, e.g. 64G (#SBATCH --mem)")
    time: str = Field("01:00:00", description="time limit, [D-]HH:MM:SS (#SBATCH --time)")
    partition: str | None = Field(None, description="#SBATCH --partition")
    account: str | None = Field(None, description="#SBATCH --account")
    job_name: str | None = Field(None, description="default: the recipe's file name")
    signal_seconds: int = Field(300, ge=10, description="send USR1 this long before the time limit: the run "
                                                        "checkpoints and a re-submitted job resumes")
    output: str = Field("shardtune-%j.out", description="#SBATCH --output")
    sbatch_options: list[str] = Field(default_factory=list, description="more #SBATCH options, e.g. --qos=high")
    setup: list[str] = Field(default_factory=list, description="shell lines run first on the batch node, e.g. "
                                                               "module load, source .venv/bin/activate")


class MLflowSection(Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (http://host:5000, sqlite:///path.db, "
                                                        "databricks); default: $MLFLOW_TRACKING_URI, else a local "
                                                        "store mlflow.db in the folder that holds output.dir")
    experiment: str = Field("shardtune", min_length=1, description="the MLflow experiment the run is filed under")


class OutputSection(Section):
    dir: str = Field(description="run output directory")
    trackers: list[Literal[tuple(TRACKERS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["tensorboard"],
        description=f"where the run's scalars go, any of {', '.join(TRACKERS)} (train/ per logged step, "
                    "validation/ per evaluation); [] for logs/train.log only")
    mlflow: MLflowSection = Field(default_factory=MLflowSection, description="output.trackers: [mlflow] settings")
    if_exists: Literal["error", "overwrite", "new"] = Field(
        "error", description="when dir already holds a run: error (refuse), overwrite (replace it once the new run "
                             "has finished), new (keep it; this run goes to a fresh dir-YYYYmmdd-HHMMSS)")
    keep_checkpoints: bool = Field(False, description="keep the run's checkpoints (ray/) after success")
    checkpoints_to_keep: int = Field(2, ge=1, le=1000, description="checkpoints kept while training: the last N, "
                                                                   "or the best N by keep_best_by (the latest is "
                                                                   "always kept too, to resume from)")
    keep_best_by: str | None = Field(None, description="a validation metric (e.g. accuracy, loss) that ranks the "
                                                       "kept checkpoints; default: keep the most recent")
    keep_best_mode: Literal["max", "min"] | None = Field(None, description="whether a higher or lower keep_best_by "
                                                                         "is better; default: min for losses, else max")

    @model_validator(mode="after")
    def _resolve_tracking_uri(self):
        # Resolved once, where the recipe is first read (the driver), so every worker and
        # the saved recipe.yaml name the same store.
        if "mlflow" in self.trackers and self.mlflow.tracking_uri is None and self.dir.strip():
            import os
            from pathlib import Path

            local = Path(self.dir).expanduser().resolve().parent / "mlflow.db"
            self.mlflow.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local}"
        return self


class Recipe(Section):
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    adapter: AdapterSection = Field(default_factory=lambda: ADAPTER_SECTIONS["lora"]())
    task: TaskSection = Field(default_factory=lambda: TASK_SECTIONS["sequence_classification"]())
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    sharding: ShardingSection = Field(default_factory=ShardingSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    output: OutputSection
    slurm: SlurmSection | None = Field(None, description="resources for `shardtune slurm` (sbatch)")

    @model_validator(mode="after")
    def _resolve_auto(self):
        """`auto` settings become what they mean for this recipe, so that the saved recipe,
        the checkpoint fingerprint and every rule see the value that trains."""
        if self.sharding.precision == "auto":
            self.sharding.precision = "bf16" if self.cluster.gpus_per_worker else "fp32"
        if self.model.dtype == "auto":
            self.model.dtype = PRECISION_DTYPES[self.sharding.precision]
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

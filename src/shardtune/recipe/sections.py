"""The recipe's sections as a typed schema (pydantic): what a user may write, with each
field's meaning (the error messages quote it). Unknown keys are errors; the adapter and
task sections are unions keyed by `method` and `type`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from shardtune.adapters.registry import adapter_families
from shardtune.schema import Beta, Section


# --------------------------------------------------------------------------- model
class ModelSection(Section):
    path: str = Field(description="hub id, local directory, or package:NAME/PATH of an installed package")
    gguf_file: str | None = Field(None, description="GGUF file inside `path` to load and dequantise")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the backbone weights are loaded in")


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
class SequenceClassificationTask(Section):
    type: Literal["sequence_classification"] = "sequence_classification"
    labels: list[str] | None = Field(
        None, description="label names in order; default: the sorted distinct labels of the training data")
    train_pooler: bool = Field(
        True, description="train the encoder's pooler with the head (BERT-style models); "
                          "sentence encoders ship an untrained pooler")

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value):
        if value is not None:
            if len(value) < 2:
                raise ValueError("needs at least two labels")
            if len(set(value)) != len(value):
                raise ValueError("labels must be distinct")
        return value


class SequenceRegressionTask(Section):
    type: Literal["sequence_regression"]
    train_pooler: bool = Field(True, description="train the encoder's pooler with the head")


class TokenClassificationTask(Section):
    type: Literal["token_classification"]
    labels: list[str] | None = Field(
        None, description="tag names; default: the training data's tags (O first, then sorted)")
    label_all_subtokens: bool = Field(
        False, description="label every sub-token of a word (default: the first only, others ignored)")

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value):
        if value is not None and len(set(value)) != len(value):
            raise ValueError("labels must be distinct")
        return value


class QuestionAnsweringTask(Section):
    type: Literal["question_answering"]
    doc_stride: int = Field(32, ge=1, description="tokens shared by consecutive windows of a long context")
    max_answer_tokens: int = Field(30, ge=1, description="longest answer span considered, in tokens")
    allow_no_answer: bool | None = Field(
        None, description="SQuAD 2.0: questions may be unanswerable; default: if the training data has any")
    no_answer_threshold: float = Field(
        0.0, description="answer no-answer when its score beats the best span by more than this; "
                         "evaluation reports the best threshold on the validation split")


class CausalLMTask(Section):
    type: Literal["causal_lm"]
    input: Literal["instruction", "chat", "text"] = Field(
        "instruction", description="instruction: instruction/input/response columns; chat: a messages list; "
                                   "text: plain text cut into max_length blocks")
    use_chat_template: bool = Field(True, description="render records with the tokenizer's chat template if it has one")
    train_on_prompt: bool = Field(False, description="also train on prompt tokens (default: response tokens only)")
    packing: bool = Field(False, description="pack several short records into each max_length sequence")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated by predict/generate")
    instruction: str | None = Field(
        None, description="one instruction for every row (the row's input column is the input); "
                          "turns a labelled data set into instruction data")
    response_map: dict[str, str] | None = Field(
        None, description="response column value -> response text, e.g. {'0': negative, '1': positive}")


class AutoVerbalizerSection(Section):
    words_per_label: int = Field(3, ge=1, le=50, description="label words chosen per label")
    candidates: int = Field(1000, ge=2, description="how many of the most probable whole-word tokens are considered")
    max_examples: int = Field(512, ge=2, description="training examples whose slot distributions are read")


class PromptClassificationTask(Section):
    type: Literal["prompt_classification"]
    templates: list[str] = Field(
        min_length=1, description="prompt templates: words, {field} (a column), {mask} (the label slot), {soft}, "
                                  "{soft:N}, {soft:words}; several are trained together and combined")
    verbalizer: dict[str, list[str] | str] | Literal["auto"] = Field(
        description="label -> label word(s), or auto: words found from the model's output distribution")
    labels: list[str] | None = Field(None, description="label names in order; default: the verbalizer's labels")
    family: Literal["auto", "causal_lm", "masked_lm", "seq2seq"] = Field(
        "auto", description="how the LM predicts the label word: the next token (causal_lm), the [MASK] position "
                            "(masked_lm), the decoder's first token (seq2seq); auto: from the model's config")
    template_weights: list[float] | Literal["uniform", "learned"] = Field(
        "uniform", description="how templates' label probabilities are averaged: uniform, these weights, or "
                               "learned on the validation split")
    share_soft_tokens: bool = Field(False, description="templates share one table of soft tokens (else each its own)")
    calibrate: bool = Field(False, description="divide label probabilities by those of a content-free input (N/A)")
    chat: bool = Field(False, description="causal LMs: the prompt is the user's message in the tokenizer's chat "
                                          "template, the label word the assistant's first word")
    auto_verbalizer: AutoVerbalizerSection = Field(default_factory=AutoVerbalizerSection)

    @field_validator("templates")
    @classmethod
    def _templates_parse(cls, value):
        from shardtune.prompting.template import parse

        for i, template in enumerate(value):
            try:
                parse(template)
            except ValueError as exc:
                raise ValueError(f"template {i} '{template}': {exc}") from None
        return value

    @field_validator("verbalizer")
    @classmethod
    def _words(cls, value):
        if isinstance(value, dict):
            if len(value) < 2:
                raise ValueError("needs label words for at least two labels")
            empty = [label for label, words in value.items() if not words or (isinstance(words, list) and not all(
                isinstance(w, str) and w.strip() for w in words))]
            if empty:
                raise ValueError(f"label(s) {empty} have no (or empty) label words")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if isinstance(self.verbalizer, dict) and self.labels is not None:
            missing = [label for label in self.labels if label not in self.verbalizer]
            if missing:
                raise ValueError(f"verbalizer has no label words for label(s) {missing}; add them, e.g. "
                                 f"{missing[0]}: [word]")
        if isinstance(self.template_weights, list):
            if len(self.template_weights) != len(self.templates):
                raise ValueError(f"template_weights has {len(self.template_weights)} weights for "
                                 f"{len(self.templates)} templates")
            if any(w < 0 for w in self.template_weights) or sum(self.template_weights) <= 0:
                raise ValueError("template_weights must be non-negative and not all zero")
        return self

    def has_soft_tokens(self) -> bool:
        from shardtune.prompting.template import parse

        return any(piece.kind == "soft" for t in self.templates for piece in parse(t))


TaskSection = Annotated[Union[SequenceClassificationTask, SequenceRegressionTask, TokenClassificationTask,
                              QuestionAnsweringTask, CausalLMTask, PromptClassificationTask],
                        Field(discriminator="type")]
TASK_TYPES = ["sequence_classification", "sequence_regression", "token_classification", "question_answering",
              "causal_lm", "prompt_classification"]
TASK_ROLES = {  # data.columns roles each task reads
    "sequence_classification": {"text", "text_b", "label"},
    "sequence_regression": {"text", "text_b", "label"},
    "token_classification": {"tokens", "tags"},
    "question_answering": {"id", "question", "context", "answers"},
    "causal_lm": {"instruction", "input", "response", "messages", "text"},
    "prompt_classification": {"label"},  # plus every {field} its templates read
}
TASK_FORMATS = {  # formats that only make sense for some tasks
    "textdir": {"sequence_classification", "prompt_classification", "causal_lm"},
    "conll": {"token_classification"},
    "wordtag": {"token_classification"},
    "squad": {"question_answering"},
}


# ---------------------------------------------------------------------------- data
DATA_FORMATS = ("jsonl", "json", "csv", "tsv", "textdir", "conll", "wordtag", "squad")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}


class DataSource(Section):
    path: str = Field(description="file (or folder, for textdir) path or package:NAME/PATH")
    format: Literal["jsonl", "json", "csv", "tsv", "textdir", "conll", "wordtag", "squad"] | None = Field(
        None, description="file format; default: from the file suffix. textdir: one sub-folder per label, "
                          "one text file per example; conll: token<TAB>...<TAB>tag lines, blank line between "
                          "sentences; wordtag: a sentence a line of word###TAG; squad: SQuAD 1.1/2.0 json")
    header: bool = Field(True, description="csv/tsv: the first row names the columns")
    column_names: list[str] | None = Field(None, description="csv/tsv without header: the column names")
    token_prefix: str | None = Field(None, description="conll: strip this prefix from tokens (WikiANN's 'en:')")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        return _SUFFIX_FORMATS.get(Path(self.path).suffix.lower(), "")


class AugmentSection(Section):
    probability: float = Field(0.5, gt=0, le=1, description="share of training examples augmented, drawn anew each epoch")
    synonym_replace: float = Field(0.1, ge=0, le=1, description="chance that each word becomes a WordNet synonym")
    random_insert: float = Field(0.0, ge=0, le=1, description="insert rate x words synonyms of words at random places")
    random_swap: float = Field(0.0, ge=0, le=1, description="swap rate x words pairs of words")
    random_delete: float = Field(0.0, ge=0, lt=1, description="chance that each word is dropped")
    sentence_shuffle: float = Field(0.0, ge=0, le=1, description="chance that a text's sentences are reordered")


class DataSection(Section):
    train: DataSource = Field(description="training data")
    validation: DataSource | None = Field(None, description="validation data; default: split from train")
    validation_split: float = Field(0.1, gt=0, lt=1, description="fraction of train held out when no validation file")
    columns: dict[str, str] = Field(
        default_factory=dict, description="task role -> column name, e.g. {text: sentence, label: label}")
    max_length: int = Field(128, ge=8, le=32768, description="tokens per example after truncation")
    max_chars: int = Field(1_000_000, ge=1, description="a text field longer than this is a bad row (it would be "
                                                        "tokenised for minutes only to be truncated)")
    max_train_examples: int | None = Field(None, ge=1, description="use a seeded sample of this many training rows")
    max_eval_examples: int | None = Field(None, ge=1, description="use a seeded sample of this many validation rows")
    few_shot_per_class: int | None = Field(
        None, ge=1, description="few-shot: train on a seeded draw of this many rows per label (classification)")
    augment: AugmentSection | None = Field(
        None, description="augment training examples on the fly (label-preserving for tagging and QA)")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="a row that does not fit the task: stop with its file and line (error), "
        "or leave it out and report the count (skip)")


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


# ------------------------------------------------------------------------ sharding
class ShardingSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="keep optimizer state in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="keep parameters in CPU memory (ZeRO 3)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="training precision")


# ------------------------------------------------------------------------- cluster
class ClusterSection(Section):
    workers: int = Field(2, ge=1, le=4096, description="training processes (one per GPU, or per CPU slot)")
    cpus_per_worker: float = Field(1, gt=0, le=1024, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker; 0 trains on CPU")
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


class OutputSection(Section):
    dir: str = Field(description="run output directory")
    if_exists: Literal["error", "overwrite"] = Field(
        "error", description="what to do when dir already holds a run")
    keep_checkpoints: bool = Field(False, description="keep the run's checkpoints (ray/) after success")
    checkpoints_to_keep: int = Field(2, ge=1, le=1000, description="checkpoints kept while training: the last N, "
                                                                   "or the best N by keep_best_by (the latest is "
                                                                   "always kept too, to resume from)")
    keep_best_by: str | None = Field(None, description="a validation metric (e.g. accuracy, loss) that ranks the "
                                                       "kept checkpoints; default: keep the most recent")
    keep_best_mode: Literal["max", "min"] | None = Field(None, description="whether a higher or lower keep_best_by "
                                                                         "is better; default: min for losses, else max")


class Recipe(Section):
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    adapter: AdapterSection = Field(default_factory=lambda: ADAPTER_SECTIONS["lora"]())
    task: TaskSection = Field(default_factory=SequenceClassificationTask)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    sharding: ShardingSection = Field(default_factory=ShardingSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    output: OutputSection
    slurm: SlurmSection | None = Field(None, description="resources for `shardtune slurm` (sbatch)")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

"""Classification by prompting: a template turns each row into a cloze the pretrained LM
fills at the label slot, and a verbalizer maps label words to labels. No new head: the
LM's own output layer scores the words (task.templates, task.verbalizer).

Several templates are all trained and combined at prediction time by averaging their
label probabilities (task.template_weights: uniform, given, or learned on the validation
split). Training modes follow from adapter.method: any adapter or full fine-tuning trains
on the prompted data with the loss on the label words; prompt_tuning / p_tuning /
prefix_tuning or `frozen` (only the template's {soft} tokens) keep the LM frozen; and
`shardtune eval RECIPE` scores the untrained model zero-shot.

Columns: every {field} of the templates (data.columns may map a field to another
column) and `label`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from shardtune.data import Row
from shardtune.errors import DataError, RecipeError
from shardtune.metrics import classification_metrics
from shardtune.prompting import family_of_config
from shardtune.prompting import template as tpl
from shardtune.schema import Section, TaskBase
from shardtune.tasks.base import Example, class_labels, no_grad, read_label
from shardtune.tasks.registry import Can, TaskKind, TaskRule, register_task

if TYPE_CHECKING:
    import torch

    from shardtune.prompting.model import PromptModel

MODEL_CLASSES = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
                 "seq2seq": "AutoModelForSeq2SeqLM"}  # transformers' auto classes, imported when a model is built
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "masked_lm": "FEATURE_EXTRACTION", "seq2seq": "SEQ_2_SEQ_LM"}


# ------------------------------------------------------------------- recipe section
class AutoVerbalizerSection(Section):
    words_per_label: int = Field(3, ge=1, le=50, description="label words chosen per label")
    candidates: int = Field(1000, ge=2, description="how many of the most probable whole-word tokens are considered")
    max_examples: int = Field(512, ge=2, description="training examples whose slot distributions are read")


class PromptClassificationSection(TaskBase):
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


# ----------------------------------------------------------------------------- task
class PromptClassification:
    target_keys = ("labels",)

    def __init__(self, recipe):
        from shardtune.backbone import load_config

        self.options, self.recipe = recipe.task, recipe
        self.max_length = recipe.data.max_length
        self.columns = recipe.data.columns
        self.label_col = self.columns.get("label", "label")
        self.templates = [tpl.parse(t) for t in self.options.templates]  # validated with the recipe
        self.config = load_config(recipe)
        self.family = self.options.family if self.options.family != "auto" else family_of_config(self.config)
        self.peft_task_type = PEFT_TASK_TYPES[self.family]
        auto = self.options.verbalizer == "auto"
        self.verbalizer: dict[str, list[str]] | None = None if auto else {
            label: [words] if isinstance(words, str) else list(words) for label, words in self.options.verbalizer.items()}
        self.labels = list(self.options.labels or (self.verbalizer or {})) or None
        given = self.options.template_weights
        self.weights = np.array(given, dtype=np.float64) if isinstance(given, list) else None
        self.content_free: np.ndarray | None = None
        self._renderers = None

    # ----------------------------------------------------------------- labels & model
    def check(self, tokenizer) -> None:
        """What needs the tokenizer: the slot token, label words, soft-token initial words."""
        from shardtune.prompting import verbalizer as vb

        problems = []
        if self.family == "causal_lm":
            for i, pieces in enumerate(self.templates):
                if not tpl.mask_ends(pieces):
                    problems.append(f"task.templates[{i}]: a causal LM predicts the next token, so {{mask}} must end "
                                    f"the template (model.path is a causal LM); move the text after it before it")
        if self.family == "masked_lm" and tokenizer.mask_token_id is None:
            problems.append("task.family masked_lm: the tokenizer has no mask token; is model.path a masked LM?")
        if self.options.chat and not getattr(tokenizer, "chat_template", None):
            problems.append("task.chat: the tokenizer has no chat template; set chat: false")
        if self.options.chat and self.family != "causal_lm":
            problems.append("task.chat: chat templates are for causal LMs; set chat: false")
        if problems:  # the renderers below cannot be built for these
            raise RecipeError(problems)
        if self.verbalizer:
            problems += list(dict.fromkeys(  # one message per word, whichever templates spell it badly
                f"task.verbalizer.{label}: label word '{word}' {why}; choose another word"
                for space in self._spaces(tokenizer) for label, words in self.verbalizer.items() for word in words
                if (why := vb.unencodable(tokenizer, word, space))))
        for i, pieces in enumerate(self.templates):
            for piece in pieces:
                if piece.kind == "soft" and piece.value and (why := vb.unencodable(tokenizer, piece.value, False)):
                    problems.append(f"task.templates[{i}]: {{soft:{piece.value}}} {why}")
        if problems:
            raise RecipeError(problems)

    def fit_labels(self, train_rows: list[Row]) -> None:
        if self.labels is not None:
            return
        self.labels = class_labels(train_rows, self.row_label, self.label_col)

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        model, info = self._model_class().from_pretrained(model_path, output_loading_info=True, **load_kwargs)
        if info["missing_keys"]:
            # A prompt reads the LM's own output layer; one initialised at random scores nothing.
            raise RecipeError(f"model.path {self.recipe.model.path} has no pretrained {self.family} head "
                              f"(missing: {', '.join(sorted(info['missing_keys'])[:3])}, ...): prompting reads the "
                              "LM's own output layer. Use a checkpoint saved with its LM head, or set task.family")
        return model

    def build_model_from_config(self, config) -> torch.nn.Module:
        return self._model_class().from_config(config)

    def _model_class(self):
        import transformers

        return getattr(transformers, MODEL_CLASSES[self.family])

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return []  # the LM's own output layer scores the label words: no new head

    def soft_token_count(self, tokenizer) -> int:
        """Rows of the soft-token table: the renderers number them (from 0 in every template
        when shared, consecutively otherwise)."""
        return 1 + max((i for r in self.renderers(tokenizer) for run in r.soft_runs for i in run), default=-1)

    def wrap(self, model: torch.nn.Module, tokenizer, saved: str | None = None) -> PromptModel:
        """The trainable prompt model around the (adapted) LM; `saved`: a run's folder holding
        trained soft tokens."""
        from shardtune.prompting import verbalizer as vb
        from shardtune.prompting.model import PromptModel, load_soft_tokens

        soft = load_soft_tokens(saved) if saved else None
        if soft is None and self.soft_token_count(tokenizer):
            soft = self._initial_soft_tokens(model, tokenizer)
        words = vb.WordTable(self.verbalizer, self.labels, tokenizer, self._spaces(tokenizer)) if self.verbalizer else None
        from shardtune.adapters import adapter_family

        return PromptModel(model, self.family, words, len(self.templates), soft,
                           save_lm=adapter_family(self.recipe.adapter.method).trains_weights)

    def _initial_soft_tokens(self, model, tokenizer) -> torch.Tensor:
        """From the given words' embeddings, else from randomly drawn vocabulary embeddings
        (better than random vectors: Lester et al. 2021). Seeded: every rank agrees."""
        import torch

        from shardtune.partitions import whole

        weight = model.get_input_embeddings().weight
        with whole([weight]):  # ZeRO-3 builds the table partitioned
            embeddings = weight.detach().float().clone()
        generator = torch.Generator().manual_seed(self.recipe.train.seed)
        table = embeddings[torch.randint(0, len(tokenizer), (self.soft_token_count(tokenizer),),
                                         generator=generator)].clone()
        for pieces, renderer in zip(self.templates, self.renderers(tokenizer)):
            for piece, run in zip([p for p in pieces if p.kind == "soft"], renderer.soft_runs):
                if piece.value:
                    table[run] = embeddings[tpl.word_ids(tokenizer, piece.value)]
        return table

    def _spaces(self, tokenizer) -> list[bool]:
        """Per template: whether its label words are spelled after a space (" positive")."""
        return [renderer.space for renderer in self.renderers(tokenizer)]

    def renderers(self, tokenizer) -> list[tpl.TemplateRenderer]:
        if self._renderers is None:
            start, renderers = 0, []
            for pieces in self.templates:
                renderer = tpl.TemplateRenderer(pieces, tokenizer, self.family, self.max_length,
                                                0 if self.options.share_soft_tokens else start, self.options.chat,
                                                getattr(self.config, "decoder_start_token_id", None))
                start += sum(len(run) for run in renderer.soft_runs)
                renderers.append(renderer)
            self._renderers = renderers
        return self._renderers

    # ------------------------------------------------------------------------- data
    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        label_ids = {name: i for i, name in enumerate(self.labels or [])}
        examples = []
        for i, row in enumerate(rows):
            target = None
            if with_targets:
                label = self.row_label(row)
                if label not in label_ids:
                    raise DataError(f"{row.where}: label '{label}' is not one of the task's labels {self.labels}; "
                                    "fix the row, or give it label words in task.verbalizer")
            target = label_ids[label] if with_targets else None
            examples.append(Example(index=i, features=self._render(self._values(row), tokenizer), target=target))
        return examples

    def _values(self, row: Row) -> dict[str, str]:
        values = {}
        for t, pieces in enumerate(self.templates):
            for field in tpl.fields(pieces):
                column = self.columns.get(field, field)
                value = row.get(column)
                if value is None:
                    raise DataError(f"{row.where}: task.templates[{t}] reads {{{field}}}, but the row has no column "
                                    f"'{column}' (columns: {sorted(row.values)}); fix the template or map the "
                                    f"field with data.columns.{field}")
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{row.where}: column '{column}' (template field {{{field}}}) is empty or not text")
                values[field] = value
        return values

    def _render(self, values: dict[str, str], tokenizer) -> dict[str, list]:
        features: dict[str, list] = {"input_ids": [], "soft_index": [], "slot": [], "decoder_input_ids": []}
        for renderer in self.renderers(tokenizer):
            try:
                rendered = renderer.render({f: values[f] for f in tpl.fields(renderer.pieces)})
            except ValueError as exc:
                raise RecipeError(f"task.templates: {exc}") from None
            features["input_ids"].append(rendered.input_ids)
            features["soft_index"].append(rendered.soft_index)
            features["slot"].append(rendered.slot)
            features["decoder_input_ids"].append(rendered.decoder_input_ids)
        return features

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        """One row per (example, template), example-major. Causal LMs are padded on the left
        so that the slot is every row's last position."""
        import torch

        sequences = [(t, ids, soft, slot, dec) for e in examples for t, (ids, soft, slot, dec) in enumerate(zip(
            e.features["input_ids"], e.features["soft_index"], e.features["slot"], e.features["decoder_input_ids"]))]
        longest = max(len(s[1]) for s in sequences)
        left = self.family == "causal_lm"
        batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "soft_index": [], "template": []}
        for t, ids, soft, _, _ in sequences:
            fill = longest - len(ids)
            pad = ([tokenizer.pad_token_id] * fill, [0] * fill, [-1] * fill)
            batch["input_ids"].append(pad[0] + ids if left else ids + pad[0])
            batch["attention_mask"].append(pad[1] + [1] * len(ids) if left else [1] * len(ids) + pad[1])
            batch["soft_index"].append(pad[2] + soft if left else soft + pad[2])
            batch["template"].append(t)
        if self.family == "masked_lm":
            batch["slot"] = [s[3] for s in sequences]
        if self.family == "seq2seq":
            batch["decoder_input_ids"] = [s[4] for s in sequences]
        if examples[0].target is not None:
            batch["labels"] = [e.target for e in examples]
        return {k: torch.tensor(v) for k, v in batch.items()}

    def row_label(self, row: Row) -> str:
        return read_label(row, self.label_col)

    # ------------------------------------------------ steps that need the model itself
    @no_grad
    def fit_verbalizer(self, model, tokenizer, examples: list[Example], device, rank: int = 0, world: int = 1,
                       log=print) -> None:
        """task.verbalizer: auto. Label words from the untrained model's slot distribution on
        the training examples (each rank scores its share; the sums are all-reduced)."""
        import torch

        from shardtune.prompting import verbalizer as vb

        if self.verbalizer is not None:
            return
        options = self.options.auto_verbalizer
        sample = examples[:options.max_examples]
        prompt_model = self.wrap(model, tokenizer).to(device).eval()  # no words yet: slot distributions only
        # On the training device: NCCL reduces only CUDA tensors.
        sums = torch.zeros(len(self.labels), len(tokenizer), dtype=torch.float64, device=device)
        counts = torch.zeros(len(self.labels), dtype=torch.float64, device=device)
        mine = sample[rank::world]
        for start in range(0, len(mine), 8):
            chunk = mine[start:start + 8]
            batch = {k: v.to(device) for k, v in self.collate(chunk, tokenizer).items() if k != "labels"}
            lp = prompt_model(**batch, slot_distribution=True).logits.double()  # (examples x templates, vocab)
            lp = lp.view(len(chunk), len(self.templates), -1).mean(1)[:, :sums.shape[1]]
            for example, row_lp in zip(chunk, lp):
                sums[example.target] += row_lp
                counts[example.target] += 1
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
            dist.all_reduce(counts)
        if (counts == 0).any():
            missing = [label for label, n in zip(self.labels, counts) if n == 0]
            raise DataError(f"task.verbalizer auto: no training examples of label(s) {missing} among the first "
                            f"{len(sample)}; raise task.auto_verbalizer.max_examples")
        counts, class_lp = counts.cpu(), (sums / counts[:, None]).cpu().numpy()
        space = self._spaces(tokenizer)[0]
        # Candidates: tokens probable under at least one class (a label word need not be
        # probable on average, only for its own class).
        candidates = vb.candidate_tokens(tokenizer, class_lp.max(0), space, options.candidates)
        chosen = vb.choose_words(class_lp, candidates, options.words_per_label)
        self.verbalizer = {label: [tokenizer.decode([t]).strip() for t in ids] for label, ids in zip(self.labels, chosen)}
        log("automatic verbalizer: " + "; ".join(f"{label}: {', '.join(words)}" for label, words in
                                                 self.verbalizer.items()))

    @no_grad
    def before_forward(self, model, tokenizer, device) -> None:
        """task.calibrate: the label probabilities of a content-free input (every field N/A)."""
        if not self.options.calibrate:
            return
        fields_all = {f for pieces in self.templates for f in tpl.fields(pieces)}
        example = Example(0, self._render({f: tpl.CONTENT_FREE for f in fields_all}, tokenizer))
        batch = {k: v.to(device) for k, v in self.collate([example], tokenizer).items()}
        self.content_free = model(**batch).logits[0].float().cpu().numpy()  # (templates, labels)

    # ---------------------------------------------------------------------- results
    def outputs(self, model_output, batch) -> list[np.ndarray]:
        return list(model_output.logits.detach().float().cpu().numpy())  # per example: (templates, labels)

    def combined_log_probs(self, outputs: list[np.ndarray],
                           targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated, combined label log-probabilities; learns the template weights first when
        asked (template_weights: learned) and targets are given. Also returns the per-template
        (calibrated) log-probabilities."""
        from shardtune.prompting import verbalizer as vb

        lp = np.stack(outputs).astype(np.float64)
        if self.content_free is not None:
            lp = vb.calibrate(lp, self.content_free.astype(np.float64))
        if self.options.template_weights == "learned" and targets is not None and len(self.templates) > 1:
            self.weights = vb.learn_weights(lp, targets)
        weights = self.weights if self.weights is not None else np.ones(len(self.templates))
        return vb.combine(lp, weights), lp

    def metrics(self, outputs: list[np.ndarray], examples: list[Example]) -> dict[str, float]:
        targets = np.array([e.target for e in examples])
        combined, per_template = self.combined_log_probs(outputs, targets)
        metrics = classification_metrics(combined, targets)
        if len(self.templates) > 1:
            for t in range(len(self.templates)):
                metrics[f"accuracy_template_{t}"] = float((per_template[:, t].argmax(-1) == targets).mean())
        return metrics

    def predictions(self, outputs: list[np.ndarray], examples: list[Example], rows: list[Row]) -> list[dict]:
        combined, _ = self.combined_log_probs(outputs)
        records = []
        for row, lp in zip(rows, combined):
            record = dict(self._values(row))
            if row.get(self.label_col) is not None:
                record["label"] = self.row_label(row)
            probs = np.exp(lp)
            record["prediction"] = self.labels[int(lp.argmax())]
            record["probabilities"] = {l: round(float(p), 6) for l, p in zip(self.labels, probs)}
            records.append(record)
        return records

    def report_tables(self, records: list[dict]) -> list:
        from shardtune.tasks.tables import classification

        return classification(self.labels, records)

    def state(self) -> dict:
        return {"labels": self.labels, "verbalizer": self.verbalizer, "family": self.family,
                "template_weights": None if self.weights is None else [float(w) for w in self.weights]}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])
        self.verbalizer = state["verbalizer"]
        if state.get("template_weights") is not None:
            self.weights = np.array(state["template_weights"])


def _template_fields(section) -> set[str]:
    return {f for t in section.templates for f in tpl.fields(tpl.parse(t))}


def _gguf_family(recipe) -> str | None:
    if recipe.model.gguf_file and recipe.task.family not in ("auto", "causal_lm"):
        return (f"task.family {recipe.task.family}: GGUF files hold causal language models; "
                "use family: causal_lm (or auto)")
    return None


register_task(TaskKind(
    "prompt_classification", PromptClassificationSection, PromptClassification,
    "classification by prompting the LM's own head: templates, verbalizers, soft prompts, zero- and few-shot",
    family="prompt", roles=frozenset({"label"}), formats=frozenset({"textdir"}), extra_roles=_template_fields,
    capabilities=frozenset({Can.REPORT, Can.CHECK_TOKENIZER, Can.FIT_ON_MODEL, Can.WRAP_MODEL, Can.PREPARE_FORWARD,
                            Can.CLASS_LABELS, Can.ZERO_SHOT}),
    causal_backbone=True, rules=(TaskRule("gguf family", _gguf_family),)))

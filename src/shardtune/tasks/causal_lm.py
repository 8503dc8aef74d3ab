"""Causal-LM tuning: instruction records, chat transcripts, or plain text.

task.input chooses how rows become token sequences:
  instruction  alpaca-style `instruction`, optional `input`, and `response` columns
  chat         a `messages` column: [{role, content}, ...]; every assistant turn is trained
  text         a `text` column; texts are joined with EOS and cut into max_length blocks
Instruction and chat records go through the tokenizer's chat template when it has one
(else a plain "### Instruction / ### Response" layout); the loss covers only response
tokens unless train_on_prompt. `packing` fills each sequence with several short
examples. Metrics: validation loss (mean over response tokens) and perplexity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from shardtune.data import Row
from shardtune.errors import DataError
from shardtune.tasks.base import Example

IGNORE = -100
PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


class CausalLM:
    peft_task_type = "CAUSAL_LM"
    target_keys = ()  # labels stay in the batch: per-example losses are computed from them
    generates = True  # `shardtune predict` generates text instead of scoring

    def __init__(self, recipe):
        self.options = recipe.task
        self.max_length = recipe.data.max_length
        columns = recipe.data.columns
        self.cols = {role: columns.get(role, default) for role, default in (
            ("instruction", "instruction"), ("input", "input"), ("response", "output"),
            ("messages", "messages"), ("text", "text"))}

    def fit_labels(self, train_rows: list[Row]) -> None:
        pass

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_path, **load_kwargs)

    def build_model_from_config(self, config) -> torch.nn.Module:
        return AutoModelForCausalLM.from_config(config)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return []  # the LM head is pretrained; nothing new to train in full

    # ------------------------------------------------------------------------- data
    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        if self.options.input == "text":
            sequences = self._text_blocks(rows, tokenizer)
        else:
            sequences = [self._record(row, tokenizer) for row in rows]
            if self.options.packing:
                sequences = self._pack(sequences)
        return [Example(index=i, features={"input_ids": ids}, target=labels) for i, (ids, labels) in
                enumerate(sequences)]

    def prompt_row(self, text: str, where: str) -> Row:
        """A user's prompt (`shardtune generate --prompt`) as the row a data file would hold, so
        that generate answers what predict answers for that row. With a fixed task.instruction
        the text is the row's input: as the instruction it would be replaced by the fixed one,
        and every prompt would get the same answer."""
        if self.options.input == "chat":
            return Row({self.cols["messages"]: [{"role": "user", "content": text}]}, where)
        role = "text" if self.options.input == "text" else "input" if self.options.instruction else "instruction"
        return Row({self.cols[role]: text}, where)

    def prompt_ids(self, row: Row, tokenizer) -> list[int]:
        """The tokens a generation for this row starts from."""
        if self.options.input == "chat":
            messages = self._messages(row)
            history = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            return self._template(tokenizer, history, generation_prompt=True)
        if self.options.input == "text":
            return tokenizer(self._field(row, "text"))["input_ids"]
        user = self._user_text(row)
        if self._uses_template(tokenizer):
            return self._template(tokenizer, [{"role": "user", "content": user}], generation_prompt=True)
        return tokenizer(PLAIN_PROMPT.format(user=user))["input_ids"]

    def _record(self, row: Row, tokenizer) -> tuple[list[int], list[int]]:
        if self.options.input == "chat":
            ids, labels = self._chat(row, tokenizer)
        else:
            prompt = self.prompt_ids(row, tokenizer)
            response = self._response(row)
            if self._uses_template(tokenizer):
                ids = self._template(tokenizer, [{"role": "user", "content": self._user_text(row)},
                                                 {"role": "assistant", "content": response}])
                if ids[:len(prompt)] != prompt:  # a template whose prompt is not a prefix of the whole
                    ids = prompt + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            else:
                ids = prompt + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            labels = list(ids) if self.options.train_on_prompt else [IGNORE] * len(prompt) + ids[len(prompt):]
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE for label in labels[1:]):
            raise DataError(f"{row.where}: no response tokens fit in data.max_length={self.max_length} after the "
                            "prompt; raise max_length or shorten the prompt")
        return ids, labels

    def _chat(self, row: Row, tokenizer) -> tuple[list[int], list[int]]:
        messages = self._messages(row)
        ids = self._template(tokenizer, messages)
        labels = list(ids) if self.options.train_on_prompt else [IGNORE] * len(ids)
        for k, message in enumerate(messages):
            if message["role"] == "assistant" and not self.options.train_on_prompt:
                start = len(self._template(tokenizer, messages[:k], generation_prompt=True))
                end = len(self._template(tokenizer, messages[: k + 1]))
                labels[start:end] = ids[start:end]
        return ids, labels

    def _text_blocks(self, rows: list[Row], tokenizer) -> list[tuple[list[int], list[int]]]:
        stream: list[int] = []
        for row in rows:
            stream += tokenizer(self._field(row, "text"), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        blocks = [stream[i:i + self.max_length] for i in range(0, len(stream), self.max_length)]
        if len(blocks) > 1 and len(blocks[-1]) < self.max_length // 4:
            blocks.pop()  # a short tail adds noise, not signal
        return [(b, list(b)) for b in blocks]

    def _pack(self, sequences):
        packed, ids, labels = [], [], []
        for seq_ids, seq_labels in sequences:
            if ids and len(ids) + len(seq_ids) > self.max_length:
                packed.append((ids, labels))
                ids, labels = [], []
            ids, labels = ids + seq_ids, labels + seq_labels
        if ids:
            packed.append((ids, labels))
        return packed

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        longest = max(len(e.features["input_ids"]) for e in examples)
        pad = tokenizer.pad_token_id
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for example in examples:
            ids = example.features["input_ids"]
            fill = longest - len(ids)
            batch["input_ids"].append(ids + [pad] * fill)
            batch["attention_mask"].append([1] * len(ids) + [0] * fill)
            batch["labels"].append((example.target or ids) + [IGNORE] * fill)
        return {k: torch.tensor(v) for k, v in batch.items()}

    # ---------------------------------------------------------------------- results
    def outputs(self, model_output, batch) -> list[np.ndarray]:
        """Per example: [summed negative log-likelihood of its label tokens, their count]."""
        # Soft-prompt adapters (prompt_tuning, p_tuning) prepend virtual tokens to the logits.
        logits = model_output.logits[:, -batch["labels"].shape[1]:]
        logits = logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                                reduction="none")
        counted = labels != IGNORE
        return list(torch.stack([nll.sum(dim=1), counted.sum(dim=1).float()], dim=1).cpu().numpy())

    def metrics(self, outputs: list[np.ndarray], examples: list[Example]) -> dict[str, float]:
        total = np.sum(outputs, axis=0)
        loss = float(total[0] / max(total[1], 1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def generate(self, model, tokenizer, rows: list[Row], *, batch_size: int = 8,
                 max_new_tokens: int | None = None) -> list[dict]:
        """Greedy continuations of each row's prompt (left-padded batches)."""
        model.eval()
        max_new = max_new_tokens or self.options.max_new_tokens
        records = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [self.prompt_ids(row, tokenizer) for row in chunk]
            longest = max(map(len, prompts))
            ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row, generated in zip(chunk, out[:, longest:]):
                text = tokenizer.decode(generated, skip_special_tokens=True).strip()
                record = {"prompt": tokenizer.decode(self.prompt_ids(row, tokenizer), skip_special_tokens=False),
                          "prediction": text}
                if self.options.input == "instruction" and row.get(self.cols["response"]) is not None:
                    record["response"] = self._response(row)
                records.append(record)
        return records

    def predictions(self, outputs: list[np.ndarray], examples: list[Example], rows: list[Row]) -> list[dict]:
        return [{"loss": float(o[0] / max(o[1], 1)), "tokens": int(o[1])} for o in outputs]

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    # ---------------------------------------------------------------------- helpers
    def _uses_template(self, tokenizer) -> bool:
        return self.options.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    @staticmethod
    def _template(tokenizer, messages, generation_prompt: bool = False) -> list[int]:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def _user_text(self, row: Row) -> str:
        instruction = self.options.instruction or self._field(row, "instruction")
        extra = row.get(self.cols["input"])
        return f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction

    def _response(self, row: Row) -> str:
        mapping = self.options.response_map
        if mapping is None:
            return self._field(row, "response")
        value = row.get(self.cols["response"])
        key = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()
        if key not in mapping:
            raise DataError(f"{row.where}: '{self.cols['response']}' value {value!r} is not in task.response_map "
                            f"({sorted(mapping)})")
        return mapping[key]

    def _messages(self, row: Row) -> list[dict]:
        messages = row.get(self.cols["messages"])
        if (not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages)):
            raise DataError(f"{row.where}: '{self.cols['messages']}' must be a list of "
                            "{role: system|user|assistant, content: text}")
        return messages

    def _field(self, row: Row, role: str) -> str:
        value = row.get(self.cols[role])
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{row.where}: '{self.cols[role]}' is missing or empty (columns: {sorted(row.values)}); "
                            f"map it with data.columns.{role}")
        return value

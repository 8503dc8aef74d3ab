"""The model a prompt task trains: a pretrained LM (with its adapter, if any) read at the
label slot through the verbalizer, plus the templates' soft tokens.

The soft tokens are this module's own parameter, spliced into the input embeddings, so any
adapter (or full fine-tuning, or none: adapter.method frozen) trains them alongside its own
weights, under every ZeRO stage: a top-level module's parameters are gathered for its
forward like any other's. They are saved next to the adapter as soft_tokens.safetensors.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers.modeling_outputs import ModelOutput

from shardtune.prompting.verbalizer import WordTable, label_log_probs

SOFT_TOKENS_FILE = "soft_tokens.safetensors"


class PromptModel(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, family: str, words: WordTable | None, n_templates: int,
                 soft_init: torch.Tensor | None, save_lm: bool = True):
        """words: None before an automatic verbalizer has chosen them (the model then gives
        only slot distributions)."""
        super().__init__()
        self.lm, self.family, self.n_templates, self.save_lm = lm, family, n_templates, save_lm
        self.has_words = words is not None
        if words is not None:
            self.register_buffer("word_ids", words.ids, persistent=False)
            self.register_buffer("word_mask", words.mask, persistent=False)
            self.register_buffer("word_label", words.word_label, persistent=False)
            self.n_labels = words.n_labels
        self.soft_tokens = torch.nn.Parameter(soft_init) if soft_init is not None else None
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        # A causal LM needs only the last position's logits (the slot, inputs are left-padded):
        # skipping the other positions' vocabulary projection saves ~20% of a small model's work.
        self.last_only = family == "causal_lm" and "logits_to_keep" in inspect.signature(base.forward).parameters

    def place_own(self, device) -> None:
        """Move this module's own tensors (soft tokens, word tables) but not the LM, whose
        quantised weights were placed on their device when loaded."""
        for name, buffer in self.named_buffers(recurse=False):
            setattr(self, name, buffer.to(device))
        if self.soft_tokens is not None:
            self.soft_tokens.data = self.soft_tokens.data.to(device)

    def forward(self, input_ids, attention_mask, soft_index, template, slot=None, decoder_input_ids=None,
                labels=None, slot_distribution: bool = False):
        embeds = self.lm.get_input_embeddings()(input_ids)
        if self.soft_tokens is not None:
            soft = self.soft_tokens[soft_index.clamp_min(0)].to(embeds.dtype)
            embeds = torch.where((soft_index >= 0).unsqueeze(-1), soft, embeds)
        kwargs = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        if self.family == "seq2seq":
            kwargs["decoder_input_ids"] = decoder_input_ids
        if self.last_only:
            kwargs["logits_to_keep"] = 1
        logits = self.lm(**kwargs).logits
        if self.family == "masked_lm":
            # Soft-prompt adapters (prompt_tuning, p_tuning) prepend their tokens' outputs.
            offset = logits.shape[1] - input_ids.shape[1]
            logits = logits[torch.arange(len(slot), device=logits.device), slot + offset]
        else:
            logits = logits[:, -1]
        slot_lp = logits.float().log_softmax(-1)
        if slot_distribution or not self.has_words:  # the whole vocabulary (the automatic verbalizer reads it)
            return ModelOutput(logits=slot_lp)
        scores = label_log_probs(slot_lp, self.word_ids[template], self.word_mask[template], self.word_label,
                                 self.n_labels).view(-1, self.n_templates, self.n_labels)
        loss = None
        if labels is not None:  # cross-entropy on the label words, every template
            loss = torch.nn.functional.nll_loss(scores.reshape(-1, self.n_labels),
                                                labels.repeat_interleave(self.n_templates))
        return ModelOutput(loss=loss, logits=scores)

    def save_pretrained(self, directory, **kwargs) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.save_lm:
            self.lm.save_pretrained(directory, **kwargs)
        if self.soft_tokens is not None:
            from safetensors.torch import save_file

            save_file({"soft_tokens": self.soft_tokens.detach().cpu().contiguous()}, directory / SOFT_TOKENS_FILE)


def load_soft_tokens(directory: Path) -> torch.Tensor | None:
    path = Path(directory) / SOFT_TOKENS_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(path)["soft_tokens"]

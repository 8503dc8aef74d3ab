"""Prompt learning: templates (template.py), verbalizers and template ensembles
(verbalizer.py), and the model that reads a pretrained LM at the label slot (model.py).
The task that puts them together is tasks/prompt_classification.py.
"""

from __future__ import annotations

FAMILIES = ("causal_lm", "masked_lm", "seq2seq")


def family_of_config(config) -> str:
    """The model family a checkpoint's config describes (task.family: auto)."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in architectures or "ForPreTraining" in architectures:
        return "masked_lm"
    if "CausalLM" in architectures or "LMHead" in architectures:
        return "causal_lm"
    masked_types = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                    "camembert", "mpnet", "modernbert"}
    return "masked_lm" if config.model_type in masked_types else "causal_lm"

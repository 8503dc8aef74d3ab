"""The reference point for shardtune's quality: the same recipe trained by the Hugging Face
Trainer + peft in one process (no Ray, no DeepSpeed), scored by the same metric code.

    python bench/hf_trainer.py recipes/sst2.yaml --out bench/results/tmp/sst2-hf.json [KEY=VALUE ...]

Same backbone, adapter (peft's get_peft_model through shardtune's adapter module), seeded
split, tokenisation, global batch (micro batch x workers x accumulation), epochs, AdamW
learning rate, warm-up, schedule, weight decay and clipping. The Trainer shuffles with its
own sampler, so the example order differs; that, and ZeRO's partitioned optimizer, are
what the comparison is about. Validation runs once after training through
`shardtune.inference.forward_outputs` and the task's own metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_with_hf_trainer(recipe_path: str, overrides: list[str]) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from shardtune import backbone
    from shardtune.adapters import apply_adapter
    from shardtune.data.pipeline import load_data
    from shardtune.inference import forward_outputs
    from shardtune.recipe import load_recipe
    from shardtune.tasks import get_task

    recipe = load_recipe(Path(recipe_path), overrides)
    tr = recipe.train
    torch.set_num_threads(max(1, int(recipe.cluster.workers * recipe.cluster.cpus_per_worker)))
    torch.manual_seed(tr.seed)
    task = get_task(recipe)
    tokenizer = backbone.load_tokenizer(recipe)
    data = load_data(recipe, task, tokenizer)
    model = apply_adapter(backbone.load_model(recipe, task, tokenizer), recipe, task)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    batch = tr.micro_batch_size * recipe.cluster.workers
    steps_per_epoch = len(data.train_examples) // (batch * tr.gradient_accumulation_steps)
    total = tr.max_steps or tr.epochs * steps_per_epoch
    warmup = tr.warmup_steps if tr.warmup_steps is not None else round(tr.warmup_ratio * total)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-trainer-"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=tr.gradient_accumulation_steps, num_train_epochs=tr.epochs,
        max_steps=total, learning_rate=tr.learning_rate, lr_scheduler_type=tr.lr_scheduler,
        warmup_steps=warmup, weight_decay=tr.weight_decay, max_grad_norm=tr.max_grad_norm or 0.0,
        adam_beta1=tr.adam_betas[0], adam_beta2=tr.adam_betas[1], seed=tr.seed, data_seed=tr.seed,
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=tr.log_every_steps,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, dataloader_drop_last=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.train_examples,
                      data_collator=lambda examples: task.collate(examples, tokenizer))
    device = next(model.parameters()).device
    before = task.metrics(forward_outputs(model, task, tokenizer, data.val_examples, 64, device),
                          data.val_examples)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    after = task.metrics(forward_outputs(model, task, tokenizer, data.val_examples, 64, device),
                         data.val_examples)
    return {"before": before, "final": after, "train_seconds": round(seconds, 1), "steps": total,
            "trainable_parameters": trainable,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    result = train_with_hf_trainer(args.recipe, args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("final", "train_seconds")}), file=sys.stderr)


if __name__ == "__main__":
    main()

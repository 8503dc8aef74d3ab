"""The large-model switches that a CPU can check: device choice and its refusals, the
precision defaults, ZeRO-3's storage and persistence settings, gradient checkpointing with
every adapter family, and the throughput / MFU / memory arithmetic."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from matrix_cells import cell_recipe
from shardtune import compat, devices, telemetry
from shardtune.errors import RecipeError, RunError
from shardtune.recipe import validate_recipe
from shardtune.sharding import PERSISTENCE_FLOOR, deepspeed_config

FAKE = {"bert": "/nowhere/bert", "llama": "/nowhere/llama", "t5": "/nowhere/t5",
        **{family: f"/nowhere/{family}.jsonl" for family in compat.FAMILIES}, "qa": "/nowhere/qa.json"}


def recipe(family="classification", method="lora", quant="none", zero=2, **sections):
    raw = cell_recipe(FAKE, Path("/nowhere/out"), method=method, quant=quant, zero=zero, family=family)
    del raw["sharding"]["precision"]  # the default (auto) unless a test sets it
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


# ------------------------------------------------------------------------- devices
def test_a_cpu_recipe_trains_on_the_cpu_with_gloo():
    device = devices.worker_device(validate_recipe(recipe(), check_files=False))
    assert device == torch.device("cpu") and devices.backend(device) == "gloo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_gpus_where_there_is_no_cuda_is_refused_with_the_fix():
    gpu = validate_recipe(recipe(cluster={"gpus_per_worker": 1}, sharding={"precision": "fp32"}), check_files=False)
    with pytest.raises(RunError) as caught:
        devices.worker_device(gpu, launcher_device=torch.device("cpu"))
    message = caught.value.render()
    assert "sees no CUDA device" in message and "SHARDTUNE_DEVICE=cuda" in message
    assert "cluster.gpus_per_worker: 0" in message


@pytest.mark.parametrize("value", [0.5, 2, -1])
def test_gpus_per_worker_is_zero_or_one(value):
    with pytest.raises(RecipeError, match=r"cluster.gpus_per_worker: input should be 0 or 1"):
        validate_recipe(recipe(cluster={"gpus_per_worker": value}), check_files=False)


@pytest.mark.parametrize("gpus, precision, dtype", [(0, "fp32", "float32"), (1, "bf16", "bfloat16")])
def test_auto_precision_is_bf16_on_gpus_and_the_backbone_loads_in_it(gpus, precision, dtype):
    resolved = validate_recipe(recipe(cluster={"gpus_per_worker": gpus}), check_files=False)
    assert (resolved.sharding.precision, resolved.model.dtype) == (precision, dtype)
    explicit = validate_recipe(recipe(cluster={"gpus_per_worker": gpus}, sharding={"precision": "fp32"},
                                      model={"dtype": "float32"}), check_files=False)
    assert (explicit.sharding.precision, explicit.model.dtype) == ("fp32", "float32")


def test_flash_attention_without_the_package_is_refused():
    from shardtune import backbone

    asked = validate_recipe(recipe(model={"attn_implementation": "flash_attention_2"}), check_files=False)
    if backbone.flash_attention_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(RunError, match="flash_attention_2 needs the flash-attn package"):
        backbone.attn_implementation(asked)
    assert backbone.attn_implementation(validate_recipe(recipe(), check_files=False)) is None  # transformers' choice
    eager = validate_recipe(recipe(model={"attn_implementation": "eager"}), check_files=False)
    assert backbone.load_kwargs(eager)["attn_implementation"] == "eager"


# ------------------------------------------------------------------- DeepSpeed config
def test_zero3_keeps_adapters_whole_and_overlaps_communication_on_gpus():
    r = validate_recipe(recipe(zero=3), check_files=False)
    cpu = deepspeed_config(r, 2)["zero_optimization"]
    assert cpu["overlap_comm"] is False and cpu["stage3_param_persistence_threshold"] == PERSISTENCE_FLOOR
    # An 8 B model's LoRA r=16 on the MLP: 16 x 14336 elements, kept whole.
    gpu = deepspeed_config(r, 8, on_gpu=True, keep_whole=16 * 14336)["zero_optimization"]
    assert gpu["overlap_comm"] is True and gpu["stage3_param_persistence_threshold"] == 16 * 14336


def test_the_largest_trainable_parameter_sets_what_stays_whole_up_to_a_cap():
    from shardtune.partitions import KEEP_WHOLE_CAP, largest_trainable

    model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Linear(400, 2))
    model[0].weight.requires_grad_(False)
    assert largest_trainable(model) == 400 * 2
    huge = torch.nn.Parameter(torch.empty(0))
    huge.ds_numel = KEEP_WHOLE_CAP + 1  # a partitioned embedding copy (modules_to_save)
    model.register_parameter("table", huge)
    assert largest_trainable(model) == 400 * 2


# ------------------------------------------------------------ gradient checkpointing
def _families_on_causal_lm():
    from shardtune.adapters import adapter_families

    return [f.method for f in adapter_families() if compat.refusal(f.method, "none", 2, "causal_lm") is None
            and f.method != "prefix_tuning"]  # refused, below


def test_prefix_tuning_with_checkpointing_is_refused_with_the_alternatives():
    raw = recipe(family="causal_lm", method="prefix_tuning", train={"gradient_checkpointing": True})
    with pytest.raises(RecipeError, match="set train.gradient_checkpointing: false, or use adapter.method"):
        validate_recipe(raw, check_files=False)


@pytest.mark.parametrize("method", _families_on_causal_lm())
def test_gradient_checkpointing_recomputes_and_leaves_the_gradients_unchanged(tiny_llama, method):
    """Each adapter family: a decoder layer's attention runs twice per step with checkpointing
    (once more in the backward pass) and the trainable parameters get the same gradients."""
    from transformers import AutoTokenizer

    from shardtune import backbone
    from shardtune.adapters import apply_adapter
    from shardtune.tasks import get_task

    raw = cell_recipe({**FAKE, "llama": str(tiny_llama)}, Path("/nowhere/out"), method=method, quant="none", zero=2,
                      family="causal_lm")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, calls = {}, {}
    for checkpointed in (False, True):
        raw = copy.deepcopy(raw)
        raw["train"]["gradient_checkpointing"] = checkpointed
        r = validate_recipe(raw, check_files=False)
        task = get_task(r)
        torch.manual_seed(0)
        model = backbone.load_model(r, task, AutoTokenizer.from_pretrained(tiny_llama))
        if checkpointed:
            backbone.enable_gradient_checkpointing(model)
        attention = model.model.layers[0].self_attn
        model = apply_adapter(model, r, task).train()
        count = [0]
        attention.register_forward_hook(lambda *args: count.__setitem__(0, count[0] + 1))
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        calls[checkpointed] = count[0]
        grads[checkpointed] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert calls == {False: 1, True: 2}
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_without_checkpointing_support_is_refused():
    from shardtune import backbone

    with pytest.raises(RecipeError, match="does not support gradient checkpointing"):
        backbone.enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ throughput and MFU
def test_the_flop_count_is_lora_accounting():
    shape = telemetry.ModelShape(matmul_weights=1_000, trainable_matmul_weights=10, layers=2, hidden=8)
    # 4 x 1000 + 2 x 10 per token, x 3 sequences x 5 tokens; attention 12 x 2 x 8 x 5^2 x 3.
    assert shape.flops(tokens=15, sequences=3, sequence_length=5) == 4020 * 15 + 12 * 2 * 8 * 25 * 3
    full = telemetry.ModelShape(matmul_weights=1_000, trainable_matmul_weights=1_000, layers=0, hidden=0)
    assert full.flops(1, 1, 1) == 6 * 1_000  # full fine-tuning: the familiar 6N


def test_the_model_shape_counts_every_matmul_and_the_trainable_ones(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    shape = telemetry.ModelShape.of(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert shape.matmul_weights == sum(m.weight.numel() for m in linears)
    assert shape.trainable_matmul_weights == model.lm_head.weight.numel()
    assert (shape.layers, shape.hidden) == (model.config.num_hidden_layers, model.config.hidden_size)


def test_mfu_uses_the_dense_bf16_peak_and_is_null_on_a_cpu(monkeypatch):
    assert telemetry.mfu(1e12, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert telemetry.peak_tflops(torch.device("cuda", 0)) == 989.0
    assert telemetry.mfu(494.5e12, torch.device("cuda", 0)) == 0.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert telemetry.peak_tflops(torch.device("cuda", 0)) == 756.0  # the longest matching name wins
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert telemetry.mfu(1e12, torch.device("cuda", 0)) is None


def test_tokens_count_what_is_processed_and_what_is_supervised():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask,
             "labels": torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]])}
    assert telemetry.batch_tokens(batch) == (5, 3, 2, 4)
    batch["labels"] = torch.tensor([0, 1])  # one label per sequence supervises all of it
    assert telemetry.batch_tokens(batch) == (5, 5, 2, 4)


def test_the_peak_memory_can_be_reset_so_training_is_measured_apart_from_loading():
    cpu = torch.device("cpu")
    big = torch.ones(300 * 2**20 // 4)  # 300 MB
    loaded = telemetry.headline_mb(telemetry.peak_memory_mb(cpu))
    del big
    telemetry.reset_peak_memory(cpu)
    after = telemetry.headline_mb(telemetry.peak_memory_mb(cpu))
    assert after < loaded - 200, (loaded, after)


# ------------------------------------------------------------- chunked evaluation loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_token_loss_equals_the_whole_vocabulary_loss(dtype):
    from shardtune.tasks.base import token_nll

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 17, 50, generator=generator).to(dtype)
    labels = torch.randint(0, 50, (3, 17), generator=generator)
    labels[0, :5] = -100
    whole = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    for chunk in (1, 3 * 50 * 4, 10**9):  # one position at a time, four at a time, all at once
        torch.testing.assert_close(token_nll(logits, labels, chunk_elements=chunk), whole)


# ------------------------------------------------------------ collation in DataLoader workers
def test_dataloader_workers_collate_the_same_batches_from_the_memory_mapped_cache(tiny_bert, tmp_path,
                                                                                    monkeypatch):
    """train.dataloader_workers > 0: the examples (memory-mapped from the Arrow cache) and the
    task travel to a worker process, which yields the very batches the training process
    would have collated itself, in order."""
    from transformers import AutoTokenizer

    import tiny_models
    from shardtune.data import cache, read_rows
    from shardtune.data.pipeline import collated_batches, epoch_micro_batches
    from shardtune.tasks import get_task

    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", tiny_models.sentiment_rows(40, 3))
    r = validate_recipe({"model": {"path": str(tiny_bert)}, "data": {"train": str(data), "max_length": 32},
                         "output": {"dir": str(tmp_path / "run")}})
    task, tokenizer = get_task(r), AutoTokenizer.from_pretrained(tiny_bert)
    rows = read_rows(r.data.train)
    task.fit_labels(rows)
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))
    cache.write("loader", {"train": task.encode(rows, tokenizer)}, {})
    stored = cache.read("loader")[0]["train"]
    micro = epoch_micro_batches(len(stored), 2, 0, 4, 1, seed=0, epoch=0)
    here = list(collated_batches(stored, micro, task, tokenizer, workers=0, pin=False))
    there = list(collated_batches(stored, micro, task, tokenizer, workers=1, pin=False))
    assert len(here) == len(there) == len(micro) == 5
    for (size_a, a), (size_b, b) in zip(here, there):
        assert size_a == size_b and a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key

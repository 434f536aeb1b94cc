"""The training loss computed from the supervised positions only equals the model's own loss, gradients
included, and a Trainer using it takes the same optimizer steps as the stock Trainer (gradient accumulation
included)."""

from __future__ import annotations

import functools
import pytest
import torch
import torch.nn as nn

from finetune.data import DataCollator
from finetune.model.loss import accepts_logits_to_keep, label_position_loss
from finetune.training.trainer import make_trainer
from tests.unit.qat.test_qat import FAMILIES, VOCAB

peft = pytest.importorskip("peft")


def lora(model: nn.Module) -> nn.Module:
    targets = {"LlamaForCausalLM": ["q_proj", "v_proj"], "OPTForCausalLM": ["q_proj", "v_proj"],
               "GPT2LMHeadModel": ["c_attn"]}[type(model).__name__]
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                       init_lora_weights=False))
    model.train()
    return model


def rows(n: int, seed: int = 0) -> list[dict]:
    """Sequences of different lengths whose labels cover only a suffix (prompt masked, like the real data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + (i * 5) % 11
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        answer = 1 + i % 3
        labels = [-100] * (length - answer) + ids[length - answer:]
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return out


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_loss_and_gradients_as_the_model(family):
    model = lora(FAMILIES[family]()).eval()  # no dropout: both passes see the same network
    assert accepts_logits_to_keep(model)
    batch = DataCollator(pad_token_id=0)(rows(4))
    assert (batch["labels"] == -100).float().mean() > 0.5  # mostly unsupervised positions and padding

    reference = model(**batch).loss
    reference.backward()
    expected = lora_grads(model)
    model.zero_grad()

    loss, scaled = label_position_loss(model, batch)
    loss.backward()
    assert not scaled
    torch.testing.assert_close(loss, reference)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)

    n_items = int((batch["labels"][:, 1:] != -100).sum()) * 3  # as if 3 micro-batches were accumulated
    summed, scaled = label_position_loss(model, batch, num_items_in_batch=n_items)
    assert scaled
    torch.testing.assert_close(summed, model(**batch, num_items_in_batch=n_items).loss)


def test_models_without_the_mask_argument_fall_back():
    class Plain(nn.Module):
        def forward(self, input_ids, labels=None):
            return None

    assert not accepts_logits_to_keep(Plain())


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_takes_the_same_steps_as_the_stock_trainer(tmp_path, grad_accum):
    from transformers import Trainer, TrainingArguments

    data = rows(8, seed=3)
    final = {}
    for kind in ("stock", "label_positions"):
        model = lora(FAMILIES["llama"]())
        args = TrainingArguments(output_dir=str(tmp_path / kind), max_steps=2, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=grad_accum, learning_rate=5e-2, use_cpu=True,
                                 report_to=[], save_strategy="no", logging_steps=1, seed=0, data_seed=0,
                                 remove_unused_columns=False, disable_tqdm=True, lr_scheduler_type="constant")
        kwargs = dict(model=model, args=args, train_dataset=data, data_collator=DataCollator(pad_token_id=0))
        trainer = Trainer(**kwargs) if kind == "stock" else make_trainer(**kwargs)
        result = trainer.train()
        final[kind] = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                       result.training_loss)
    (stock, stock_loss), (ours, our_loss) = final["stock"], final["label_positions"]
    assert any(not torch.equal(p, lora(FAMILIES["llama"]()).get_parameter(n)) for n, p in ours.items())  # it trained
    torch.testing.assert_close(our_loss, stock_loss)
    # Adam turns float round-off in near-zero gradient entries into visible steps; the updates are ~lr = 5e-2.
    for name, value in ours.items():
        torch.testing.assert_close(value, stock[name], atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_label_position_loss_stays_on_under_ddp(tmp_path):
    """DistributedDataParallel hides the model's forward signature behind ``.module``; the check unwraps it, so
    the label-position loss is not silently replaced by the stock loss under DDP (gloo, one process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = lora(FAMILIES["llama"]())
    assert accepts_logits_to_keep(model)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert accepts_logits_to_keep(DistributedDataParallel(model))
    finally:
        dist.destroy_process_group()


def test_length_grouping_sorts_a_small_dataset_too():
    from finetune.training.trainer import SeededLengthGroupedSampler

    import random

    lengths = [random.Random(i).randint(20, 500) for i in range(48)]
    order = list(SeededLengthGroupedSampler(8, lengths, seed=3))
    assert sorted(order) == list(range(48))
    batches = [[lengths[i] for i in order[s:s + 8]] for s in range(0, 48, 8)]
    # Grouped: each batch holds neighbours in length order, so padding to its longest row wastes little.
    ranked = sorted(lengths)
    waste = sum(max(b) * len(b) - sum(b) for b in batches)
    assert waste < 0.15 * sum(lengths)  # ungrouped (the stock rule at 48 rows): ~40%
    assert max(batches[0]) == ranked[-1]  # the longest batch first, as the stock sampler does
    assert order == list(SeededLengthGroupedSampler(8, lengths, seed=3))  # the same order for the same seed


def test_right_padded_training_batches_attend_causally_without_the_mask():
    """The equality above holds on the causal path: the mask is dropped only where it changes nothing."""
    from finetune.model.loss import causal_suffices, right_padded

    model = lora(FAMILIES["llama"]()).eval()
    batch = DataCollator(pad_token_id=0)(rows(4))
    assert right_padded(batch["attention_mask"]) and (batch["attention_mask"] == 0).any()
    assert causal_suffices(model, batch["attention_mask"])
    seen = []
    handle = model.get_base_model().model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        # A hook on the model (QAT reads the mask) keeps the mask.
        assert not causal_suffices(model, batch["attention_mask"])
        label_position_loss(model, batch)
        assert seen[-1] is not None
    finally:
        handle.remove()
    left = batch["attention_mask"].flip(1)
    assert not right_padded(left) and not causal_suffices(model, left)
    calls = []
    inner = model.get_base_model().model.forward

    def spy(*args, **kw):
        calls.append(kw.get("attention_mask"))
        return inner(*args, **kw)

    model.get_base_model().model.forward = spy
    try:
        label_position_loss(model, batch)
    finally:
        del model.get_base_model().model.forward
    assert calls == [None]


def prompted_rows(n: int, prefix: int = 10) -> list[dict]:
    """Rows that all start with the same unsupervised prompt prefix (a system prompt and instruction)."""
    shared = torch.randint(0, VOCAB, (prefix,), generator=torch.Generator().manual_seed(7)).tolist()
    out = []
    for r in rows(n, seed=3):
        ids = shared + r["input_ids"]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prefix + r["labels"]})
    return out


def test_training_with_the_meter_keeps_the_mask_free_path_and_the_shared_prefix(tmp_path):
    """The throughput meter reads memory in use through a hook at the end of every training forward; that hook
    reads nothing of the sequence, so it must not turn off the shortcuts other hooks (QAT) turn off: the
    training forwards still run without the mask, the prompt prefix once."""
    from transformers import TrainingArguments

    from finetune.model.loss import causal_suffices, has_forward_hooks, observer_hook
    from finetune.training.measure import ThroughputCallback
    from finetune.training.memory import in_use_sampler

    model = lora(FAMILIES["llama"]())
    model.get_base_model().config.use_cache = False
    inner = model.get_base_model().forward
    calls = []

    @functools.wraps(inner)
    def spy(*args, **kw):
        calls.append((kw["input_ids"].shape[0], kw.get("attention_mask"), has_forward_hooks(model)))
        return inner(*args, **kw)

    model.get_base_model().forward = spy
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    meter = ThroughputCallback()
    watched = []
    if in_use_sampler() is not None:  # the hook is installed where memory in use can be read (glibc, CPU)
        begin = meter.on_train_begin

        def on_train_begin(*a, **kw):
            begin(*a, **kw)
            watched.append(meter._watch is not None)

        meter.on_train_begin = on_train_begin
    trainer = make_trainer(model=model, args=args, train_dataset=prompted_rows(4),
                           data_collator=DataCollator(pad_token_id=0), callbacks=[meter], meter=meter,
                           share_prefix=True)
    try:
        trainer.train()
    finally:
        del model.get_base_model().forward
    assert watched in ([True], [])
    # The prefix pass (one row), then the rows' rest: both without a mask, with no hook that reads the sequence.
    assert [(rows, mask, hooked) for rows, mask, hooked in calls] == [(1, None, False), (4, None, False)]
    handle = model.get_base_model().lm_head.register_forward_hook(lambda *a: None)
    batch = DataCollator(pad_token_id=0)(rows(4))
    assert has_forward_hooks(model) and not causal_suffices(model, batch["attention_mask"])  # any other hook counts
    handle.remove()
    handle = model.get_base_model().lm_head.register_forward_hook(observer_hook(lambda *a: None))
    assert not has_forward_hooks(model) and causal_suffices(model, batch["attention_mask"])
    handle.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_shared_prompt_prefix_computed_once_gives_the_same_loss_and_gradients(family):
    from finetune.model.loss import shared_prefix_length

    model = lora(FAMILIES[family]()).eval()
    model.get_base_model().config.use_cache = False  # as load_model leaves a model it loads for training
    batch = DataCollator(pad_token_id=0)(prompted_rows(4))
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    # The 10 shared tokens, or fewer where the first row's own tokens happen to agree: never more than the
    # prompt before the first supervised position.
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"], keep) >= 10

    reference, _ = label_position_loss(model, batch, share_prefix=False)
    reference.backward()
    expected = lora_grads(model)
    model.zero_grad()
    calls = []
    inner = model.get_base_model().forward

    @functools.wraps(inner)  # the same signature: what decides whether the prefix can be shared
    def spy(*args, **kw):
        calls.append(kw["input_ids"].shape)
        return inner(*args, **kw)

    model.get_base_model().forward = spy
    try:
        loss, _ = label_position_loss(model, batch, share_prefix=True)
    finally:
        del model.get_base_model().forward
    loss.backward()
    assert len(calls) == 2 and calls[0][0] == 1 and calls[1][0] == 4  # the prefix once, then the rows' rest
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(loss, model(**batch).loss * (batch["labels"][:, 1:] != -100).sum() /
                               (batch["labels"][:, 1:] != -100).sum())
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)


def test_the_prefix_is_not_shared_where_it_would_change_the_result():
    from finetune.model.loss import can_share_prefix, shared_prefix_length

    batch = DataCollator(pad_token_id=0)(prompted_rows(3))
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert shared_prefix_length(ids[:1], mask[:1], keep[:1]) == 0  # one row: nothing to share
    early = keep.clone()
    early[0, 4] = True  # a supervised position inside the prefix: its logits are needed
    assert shared_prefix_length(ids, mask, early) == 0  # 4 < the 8-token minimum
    short = mask.clone()
    short[1, 9:] = 0  # a row of 9 real tokens keeps its last one for the second pass
    assert shared_prefix_length(ids, short, keep) == 8
    model = lora(FAMILIES["llama"]())
    assert can_share_prefix(model)
    handle = model.get_base_model().model.layers[0].register_forward_hook(lambda *a: None)
    assert not can_share_prefix(model)  # QAT / simulated INT8 read every token through hooks
    handle.remove()
    model.get_base_model().gradient_checkpointing_enable()
    assert not can_share_prefix(model)  # the cache is off under gradient checkpointing


def test_share_prefix_auto_shares_in_fp32_on_the_cpu_only(tmp_path):
    """auto: an fp32 CPU step's time follows its FLOPs (the prefix pass saves some); a small model's GPU step, and a
    bf16 step on a CPU with AMX, follow the operations issued, and the prefix pass is a second forward and backward
    through every layer."""
    from transformers import TrainingArguments

    from finetune.model.loss import resolve_share_prefix
    from tests.conftest import compose_cfg

    assert compose_cfg(["model=tiny"]).trainer.share_prefix == "auto"
    assert resolve_share_prefix("auto", "cpu", "fp32") is True and resolve_share_prefix("auto", "cpu") is True
    assert resolve_share_prefix("auto", "cpu", "bf16") is False
    assert resolve_share_prefix("auto", "cuda", "fp32") is False and resolve_share_prefix("auto", "cuda", "bf16") is False
    assert resolve_share_prefix("auto", "xpu") is False
    assert resolve_share_prefix(True, "cuda") is True and resolve_share_prefix(False, "cpu") is False
    assert resolve_share_prefix(True, "cpu", "bf16") is True  # asked for: shared in any precision
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    model = lora(FAMILIES["llama"]())
    assert make_trainer(model=model, args=args, share_prefix="auto", precision="fp32").share_prefix is True  # cpu
    assert make_trainer(model=model, args=args, share_prefix="auto", precision="bf16").share_prefix is False
    assert make_trainer(model=model, args=args, share_prefix=False).share_prefix is False


def test_a_shared_prefix_step_launches_about_twice_the_operations():
    """What ``auto`` rests on, counted: the prefix pass doubles the operations of a forward and backward."""
    from finetune.training.measure import dispatched_ops

    def count_aten_ops(fn):
        return sum(dispatched_ops(fn).values())

    model = lora(FAMILIES["llama"]()).train()
    model.get_base_model().config.use_cache = False
    batch = DataCollator(pad_token_id=0)(prompted_rows(4))

    def step(share):
        return count_aten_ops(lambda: label_position_loss(model, batch, share_prefix=share)[0].backward())

    shared, whole = step(True), step(False)
    assert whole == step(False) > 0  # deterministic
    forward_only = count_aten_ops(lambda: label_position_loss(model, batch, share_prefix=False))
    assert whole > 1.5 * forward_only  # the backward's operations are counted too
    assert shared > 1.7 * whole, (shared, whole)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_collators_label_plan_gives_the_same_loss_and_gradients_without_waiting_for_the_device(family):
    """With the plan the collator makes on the host (label_plan=True), the loss selects the supervised positions by
    index: the same loss and gradients, and no operation that would stop the host until a GPU caught up."""
    from finetune.training.measure import dispatched_ops, host_syncs

    model = lora(FAMILIES[family]()).eval()
    examples = rows(4)
    reference = model(**DataCollator(pad_token_id=0)(examples)).loss
    reference.backward()
    expected = lora_grads(model)
    model.zero_grad()

    def step(batch, out):
        loss, _ = label_position_loss(model, batch, share_prefix=False)
        loss.backward()
        out.append(loss.detach())

    planned, unplanned = [], []
    batch = DataCollator(pad_token_id=0, label_plan=True)(examples)  # on the host, before the batch moves
    with_plan = dispatched_ops(lambda: step(batch, planned))
    torch.testing.assert_close(planned[0], reference.detach())
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    assert host_syncs(with_plan) == 0, {k: n for k, n in with_plan.items() if "[bool]" in k or "scalar" in k}
    model.zero_grad()
    batch = DataCollator(pad_token_id=0)(examples)
    without = dispatched_ops(lambda: step(batch, unplanned))
    torch.testing.assert_close(unplanned[0], planned[0])
    assert host_syncs(without) >= 3  # the right-padding check, the boolean selections and their gradient


def test_the_label_plan_of_packed_rows_gives_the_unpacked_loss():
    import datasets

    from finetune.data.packing import pack_rows, packed_forward_inputs

    model = lora(FAMILIES["llama"]()).eval()
    examples = rows(6)
    ds = datasets.Dataset.from_list([{**r, "length": len(r["input_ids"])} for r in examples])
    packed = pack_rows(ds, 40)
    assert len(packed) < len(examples)
    reference, _ = label_position_loss(model, DataCollator(pad_token_id=0)(examples), share_prefix=False)
    # Packing leaves each example's first token unsupervised; none of these rows supervises it anyway.
    batch = packed_forward_inputs(DataCollator(pad_token_id=0, label_plan=True)(list(packed)))
    loss, _ = label_position_loss(model, batch, share_prefix=False)
    torch.testing.assert_close(loss, reference)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_shared_prefix_from_the_collators_plan_gives_the_same_loss_and_gradients_without_waiting(family):
    """The collator measures the shared prompt prefix on the host (``layout.shared_prefix``): the prefix runs once,
    the rows' rest after it, with the loss and gradients of the whole batch and no host sync."""
    from finetune.training.measure import dispatched_ops, host_syncs

    model = lora(FAMILIES[family]()).eval()
    model.get_base_model().config.use_cache = False  # as load_model leaves a model it loads for training
    examples = prompted_rows(4)
    reference, _ = label_position_loss(model, DataCollator(pad_token_id=0)(examples), share_prefix=False)
    reference.backward()
    expected = lora_grads(model)
    model.zero_grad()
    batch = DataCollator(pad_token_id=0, label_plan=True)(examples)
    assert batch["layout"].shared_prefix >= 10  # the prompt's 10 shared tokens
    calls, out = [], []
    inner = model.get_base_model().forward

    @functools.wraps(inner)
    def spy(*args, **kw):
        calls.append(kw["input_ids"].shape)
        return inner(*args, **kw)

    def step():
        loss, _ = label_position_loss(model, batch, share_prefix=True)
        loss.backward()
        out.append(loss.detach())

    model.get_base_model().forward = spy
    try:
        ops = dispatched_ops(step)
    finally:
        del model.get_base_model().forward
    assert len(calls) == 2 and calls[0][0] == 1 and calls[1][0] == 4  # the prefix once, then the rows' rest
    torch.testing.assert_close(out[0], reference.detach())
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    assert host_syncs(ops) == 0, {k: n for k, n in ops.items() if "[bool]" in k or "scalar" in k or "nonzero" in k}


@pytest.mark.parametrize("share", [True, False, "packed"])
def test_a_steady_state_training_step_waits_for_nothing(tmp_path, share):
    """The Trainer's training step as finetune-train builds it (the collator's plan, the shared prefix as on a CPU,
    not shared as on a GPU, or packed; forward, loss and backward) issues no host sync in the steps between two
    logging steps, and the loop's own per-step read of the loss (``logging_nan_inf_filter``) is off. The collator's
    work is not counted: it runs on the host before the batch moves to the device."""
    from transformers import TrainerCallback

    from finetune.data.encoding import DataCollator as Collator
    from finetune.training.measure import HOST_SYNCS, dispatched_ops
    from finetune.training.trainer import make_trainer, training_arguments
    from finetune.model.load import resolve_precision
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["model=tiny", "trainer.max_steps=4", "trainer.batch_size=4", "trainer.logging_steps=100",
                       "trainer.save_strategy=no"])
    args = training_arguments(cfg.trainer, resolve_precision("fp32", "float32"), tmp_path, 0, [], "t", False)
    assert args.logging_nan_inf_filter is False  # the stock filter reads each step's loss on the host
    model = lora(FAMILIES["llama"]()).train()
    model.get_base_model().config.use_cache = False
    import datasets

    examples = prompted_rows(16)
    ds = datasets.Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in examples])
    per_step: list[dict] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            per_step.append({})

    trainer = make_trainer(model=model, args=args, train_dataset=ds, callbacks=[Steps()],
                           data_collator=Collator(pad_token_id=0, label_plan=True), share_prefix=share)
    inner = trainer.training_step

    def counted(model, inputs, num_items_in_batch=None):  # the batch as it reaches the step, on the device
        out = []
        per_step[-1].update(dispatched_ops(lambda: out.append(inner(model, inputs, num_items_in_batch))))
        return out[0]

    trainer.training_step = counted
    trainer.train()
    assert len(per_step) == 4
    for ops in per_step[1:-1]:  # the steady state: neither the first step nor the one before the run's end log
        assert ops and {k: n for k, n in ops.items() if k in HOST_SYNCS} == {}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_shared_prefix_packed_into_one_pass_gives_the_same_loss_and_gradients_from_the_unshared_op_count(family):
    """``trainer.share_prefix=packed``: the prefix once and each row's rest after it as one sequence under a block
    mask, one forward pass: the whole batch's loss and gradients, no host sync, and the operations of an unshared
    step rather than the two-pass form's twice as many."""
    from finetune.training.measure import dispatched_ops, host_syncs

    model = lora(FAMILIES[family]()).eval()
    model.get_base_model().config.use_cache = False
    examples = prompted_rows(4)
    plain = DataCollator(pad_token_id=0)(examples)
    reference, _ = label_position_loss(model, plain, share_prefix=False)
    reference.backward()
    expected = lora_grads(model)
    model.zero_grad()
    batch = DataCollator(pad_token_id=0, label_plan=True)(examples)
    length, width = batch["layout"].shared_prefix, batch["layout"].width
    calls, out = [], []
    inner = model.get_base_model().forward

    @functools.wraps(inner)
    def spy(*args, **kw):
        calls.append(tuple(kw["input_ids"].shape))
        return inner(*args, **kw)

    def step(share):
        loss, _ = label_position_loss(model, batch, share_prefix=share)
        loss.backward()
        out.append(loss.detach())

    model.get_base_model().forward = spy
    try:
        packed_ops = dispatched_ops(lambda: step("packed"))
    finally:
        del model.get_base_model().forward
    assert length >= 10 and calls == [(1, length + 4 * (width - length))]  # one pass over the packed sequence
    torch.testing.assert_close(out[0], reference.detach())
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    assert host_syncs(packed_ops) == 0
    model.zero_grad()
    two_pass = sum(dispatched_ops(lambda: step(True)).values())
    unshared = sum(dispatched_ops(lambda: label_position_loss(model, batch, share_prefix=False)[0].backward()).values())
    assert sum(packed_ops.values()) < 1.2 * unshared < 0.7 * two_pass, (sum(packed_ops.values()), unshared, two_pass)


def test_a_switch_that_cannot_apply_to_the_model_says_so(tmp_path, caplog):
    """trainer.head_chunk on a head whose logits are more than the head applied (GPT-2's family is not on the list)
    and share_prefix=packed under an attention that ignores block masks: one warning each, training goes on."""
    import logging

    from finetune.model.load import resolve_precision
    from finetune.training.trainer import training_arguments
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["model=tiny", "trainer.max_steps=1", "trainer.save_strategy=no"])
    args = training_arguments(cfg.trainer, resolve_precision("fp32", "float32"), tmp_path, 0, [], "t", False)
    gpt2 = lora(FAMILIES["gpt2"]())
    llama = lora(FAMILIES["llama"]())
    llama.get_base_model().config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.WARNING, logger="finetune.training.trainer"):
        make_trainer(model=gpt2, args=args, head_chunk=64, share_prefix=True)
        make_trainer(model=llama, args=args, head_chunk=64, share_prefix="packed")
    said = [r.getMessage() for r in caplog.records if r.name == "finetune.training.trainer"]
    assert len(said) == 2 and "trainer.head_chunk=64: a gpt2 head is not chunked" in said[0]
    assert "trainer.share_prefix=packed: attn_implementation=flash_attention_2" in said[1]

"""Distillation in the training step: the self-teacher is the model with its fake-quant off, alpha=0 is the plain
loss, the running sums stay on the device until a log and ride in checkpoints."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from finetune.data import DataCollator
from finetune.model.loss import label_position_logits, label_position_loss
from finetune.qat.attach import apply_qat
from finetune.training.distill import Distiller
from finetune.training.measure import dispatched_ops, host_syncs
from tests.unit.training.test_trainer_loss import lora, lora_grads, rows
from tests.unit.qat.test_qat import tiny_llama

QAT = OmegaConf.create({"scheme": "w4a8", "bits": 8, "scale": None, "granularity": "linear", "weight_bits": None,
                        "group_size": 16, "start_step": 0, "ema_decay": 0.99, "eval_int8": None, "eval_bits": 8})


def distill_cfg(**kw):
    return OmegaConf.create({"mode": "self", "teacher": None, "alpha": 0.5, "temperature": 2.0, "kl": "forward",
                             "start_step": 0, **kw})


def quantized_student():
    model = lora(tiny_llama())  # train mode, LoRA dropout 0
    handle = apply_qat(model, ["attn", "ffn"], QAT)
    return model, handle


def test_the_self_teacher_is_the_model_with_its_fake_quant_off():
    model, handle = quantized_student()
    batch = DataCollator(pad_token_id=0, label_plan=True)(rows(4))
    distiller = Distiller(distill_cfg(), qat_handle=handle)
    taught = distiller.teacher_logits(model, batch, share_prefix=False)
    assert handle.quant_on and model.training  # both restored
    student, _ = label_position_logits(model, batch, share_prefix=False)
    handle.enabled = False
    model.eval()
    with torch.no_grad():
        full_precision, _ = label_position_logits(model, batch, share_prefix=False)
    torch.testing.assert_close(taught, full_precision, rtol=0, atol=0)
    assert (student - full_precision).abs().max() > 1e-3  # W4A8 fake-quant changes the student's logits


def test_alpha_zero_is_the_plain_loss_and_the_teacher_adds_no_wait_of_its_own():
    model, handle = quantized_student()
    batch = DataCollator(pad_token_id=0, label_plan=True)(rows(4))
    found = []

    def plain_step():
        loss, _ = label_position_loss(model, batch, share_prefix=False)
        loss.backward()
        found.append(loss.detach())

    plain_syncs = host_syncs(dispatched_ops(plain_step))
    plain = found[0]
    expected = lora_grads(model)
    model.zero_grad()
    distiller = Distiller(distill_cfg(alpha=0.0), qat_handle=handle)
    out = []

    def step():
        loss, _ = distiller.loss(model, batch, share_prefix=False)
        loss.backward()
        out.append(loss.detach())

    ops = dispatched_ops(step)
    torch.testing.assert_close(out[0], plain)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    # A QAT forward keeps its attention mask (the hooks read it), and transformers checks that mask on the host
    # once per forward; the teacher's forward is one more, and the running sums add nothing.
    assert host_syncs(ops) == 2 * plain_syncs
    logged = distiller.pop_log()
    assert logged["distill/kl"] > 0 and logged["distill/ce"] > 0 and distiller.pop_log() == {}


def test_the_teacher_waits_for_qat_and_the_start_step():
    model, handle = quantized_student()
    distiller = Distiller(distill_cfg(start_step=3), qat_handle=handle)
    assert not distiller.active(2) and distiller.active(3)
    handle.enabled = False  # before qat.start_step the teacher would be the student itself
    assert not distiller.active(5)


def test_the_running_sums_survive_a_checkpoint():
    model, handle = quantized_student()
    batch = DataCollator(pad_token_id=0, label_plan=True)(rows(3))
    first = Distiller(distill_cfg(), qat_handle=handle)
    first.loss(model, batch, share_prefix=False)
    first.pop_log()
    first.loss(model, batch, share_prefix=False)
    saved = first.checkpoint_state()
    again = Distiller(distill_cfg(), qat_handle=handle)
    again.restore_checkpoint_state(saved)
    assert again.pop_log() == first.pop_log() and again.summary() == first.summary()
    assert first.summary()["distilled_tokens"] == 2 * int((batch["labels"] != -100).sum())

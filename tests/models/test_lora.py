"""LoRA through PEFT: exact base function at init and with adapters disabled, only adapters (and heads)
train, merged weights under the base names reproduce the adapted model, the export loads without peft."""
from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastrlhf.models import PolicyWithLoss, RewardModel, tiny_gpt2, tiny_llama
from fastrlhf.models.lora import (
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    has_lora,
    merged_state_dict,
    save_merged_pretrained,
)

V = 61
ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    return ids, attn


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_starts_at_the_base_and_disabling_restores_it(arch):
    base = ARCHS[arch](V, seed=3)
    lm = ARCHS[arch](V, seed=3)
    apply_lora(lm, rank=4, alpha=8, dropout=0.0)
    assert has_lora(lm)
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids, attn = _ids()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=attn).logits
        torch.testing.assert_close(lm(input_ids=ids, attention_mask=attn).logits, ref)
        _perturb(lm)
        adapted = lm(input_ids=ids, attention_mask=attn).logits
        assert (adapted - ref).abs().max() > 1e-3
        with adapters_disabled(lm):
            torch.testing.assert_close(lm(input_ids=ids, attention_mask=attn).logits, ref)
        torch.testing.assert_close(lm(input_ids=ids, attention_mask=attn).logits, adapted)
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == trainable  # grads come back


def test_reference_logprobs_from_the_actor_with_adapters_disabled():
    ref_policy = PolicyWithLoss(tiny_llama(V, seed=4), backend="torch")
    actor = PolicyWithLoss(apply_lora(tiny_llama(V, seed=4), rank=4), backend="torch")
    _perturb(actor)
    ids, attn = _ids(1)
    with torch.no_grad():
        want, _, _ = ref_policy(ids, attn, mode="logprobs", prompt_len=4)
        with adapters_disabled(actor):
            got, _, _ = actor(ids, attn, mode="logprobs", prompt_len=4)
        moved, _, _ = actor(ids, attn, mode="logprobs", prompt_len=4)
    torch.testing.assert_close(got, want)
    assert (moved - want).abs().max() > 1e-4


def test_fused_loss_trains_only_adapters():
    actor = PolicyWithLoss(apply_lora(tiny_llama(V, seed=5), rank=2), backend="torch")
    ids, attn = _ids(2)
    mask = attn[:, 4:].bool()
    loss, _, _ = actor(ids, attn, mode="loss", prompt_len=4, old_logprobs=torch.full(mask.shape, -4.0),
                       advantages=torch.randn(mask.shape), mask=mask)
    loss.backward()
    with_grad = {n for n, p in actor.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any("lora_B" in n and actor.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_weights_reproduce_the_adapted_model_and_export(arch, tmp_path):
    lm = apply_lora(ARCHS[arch](V, seed=6), rank=4, alpha=16)
    _perturb(lm)
    merged = merged_state_dict(lm)
    plain = ARCHS[arch](V, seed=99)
    assert set(merged) == set(plain.state_dict())  # the base model's own names
    plain.load_state_dict(merged)
    ids, attn = _ids(3)
    with torch.no_grad():
        want = lm(input_ids=ids, attention_mask=attn).logits
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=attn).logits, want, atol=1e-5, rtol=1e-5)
    save_merged_pretrained(lm, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=attn).logits, want, atol=1e-5, rtol=1e-5)


def test_reward_model_head_trains_fully_with_lora():
    rm = RewardModel(tiny_llama(V, seed=7))
    apply_lora(rm, rank=2, target_modules=["q_proj", "v_proj"])
    state = adapter_state_dict(rm)
    assert "head.weight" in state and all("lora_" in k or k == "head.weight" for k in state)
    assert any(".q_proj.lora_A" in k for k in state) and not any("o_proj" in k for k in state)
    with pytest.raises(ValueError, match="lora_target_modules"):
        apply_lora(RewardModel(tiny_llama(V)), rank=2, target_modules=["no_such_linear"])
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        apply_lora(tiny_llama(V), rank=0)


def test_peft_is_optional_at_import(monkeypatch):
    import importlib

    import fastrlhf.models.lora as lora

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    importlib.reload(lora)
    with pytest.raises(ImportError, match="pip install peft"):
        lora.apply_lora(tiny_llama(V), rank=2)

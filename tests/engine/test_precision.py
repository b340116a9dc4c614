"""Numerics of the scale path on CPU: bf16 compute with fp32 masters, gradient checkpointing in train mode
with dropout at 0, the precision key and its deprecated aliases, fused/foreach AdamW."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastrlhf.config import ConfigError
from fastrlhf.engine.precision import (
    adamw,
    autocast,
    enable_gradient_checkpointing,
    legacy_precision,
    resolve_precision,
    zero_dropout,
)
from fastrlhf.models import tiny_gpt2, tiny_llama
from fastrlhf.models.policy import PolicyWithLoss

VOCAB = 103


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _ten_steps(model, ids, *, precision, lr=1e-6):
    opt = adamw(model.parameters(), lr=lr)
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            loss = _lm_loss(model, ids)
        loss.backward()
        opt.step()
    return model


def test_bf16_with_fp32_masters_updates_like_fp32_at_lr_1e6():
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    start = tiny_llama(VOCAB, seed=0).state_dict()
    fp32 = _ten_steps(tiny_llama(VOCAB, seed=0), ids, precision="fp32").state_dict()
    mixed = _ten_steps(tiny_llama(VOCAB, seed=0), ids, precision="bf16").state_dict()
    pure = tiny_llama(VOCAB, seed=0).to(torch.bfloat16)
    _ten_steps(pure, ids, precision="fp32")  # bf16 weights and bf16 AdamW state: no master copy
    key = "model.layers.0.mlp.down_proj.weight"
    d32 = fp32[key] - start[key]
    dmix = mixed[key] - start[key]
    assert mixed[key].dtype == torch.float32  # masters stay fp32
    assert d32.abs().max() > 5e-6  # ten steps of ~1e-6 moved every weight
    # the bf16 run changes the weights as fp32 does, up to bf16 noise in the gradients (of the update)
    # (measured: relative error of the update 0.059, cosine 0.998, signs agree on 99.9% of weights;
    # bf16 weights updated by bf16 AdamW: relative error 3.4, 98% of weights unchanged)
    rel = float((dmix - d32).norm() / d32.norm())
    cos = float(torch.nn.functional.cosine_similarity(dmix.flatten(), d32.flatten(), 0))
    assert rel < 0.1 and cos > 0.995, (rel, cos)
    assert float((torch.sign(dmix) == torch.sign(d32)).float().mean()) > 0.99
    # whereas bf16 weights lose the update to rounding (the failure fp32 masters fix)
    unchanged = float((pure.state_dict()[key] == start[key].to(torch.bfloat16)).float().mean())
    assert unchanged > 0.95, unchanged


def _count_layer0(model):
    calls = []
    layer = model.lm.model.layers[0]
    # a pre-hook: non-reentrant recomputation stops early, before a forward hook would fire
    layer.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def _ppo_grads(checkpointing: bool):
    model = PolicyWithLoss(tiny_llama(VOCAB, seed=1, num_layers=2), backend="torch")
    if checkpointing:
        enable_gradient_checkpointing(model)
    zero_dropout(model)
    model.train()
    calls = _count_layer0(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    r = 20 - 6
    loss, _, _ = model(ids, mask, mode="loss", prompt_len=6, old_logprobs=-torch.rand(3, r, generator=g) - 4,
                       advantages=torch.randn(3, r, generator=g), mask=torch.ones(3, r, dtype=torch.bool))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


def test_gradient_checkpointing_same_grads_and_layer_runs_twice():
    plain, calls_plain = _ppo_grads(False)
    ckpt, calls_ckpt = _ppo_grads(True)
    assert calls_plain == 1 and calls_ckpt == 2  # forward, then again in backward
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=0)


def test_zero_dropout_makes_train_mode_equal_eval_mode():
    model = tiny_gpt2(VOCAB, dropout=0.3, seed=0)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(ids).logits, model.eval()(ids).logits)  # dropout is live in train mode
    assert zero_dropout(model) > 0
    want = model.eval()(ids).logits
    model.train()
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_precision_key_and_deprecated_aliases():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert legacy_precision("SFTConfig", "auto", bf16=None, dtype="bfloat16") == "bf16"
        assert legacy_precision("SFTConfig", "auto", bf16=False, dtype=None) == "fp32"
    assert all("precision" in str(x.message) for x in w) and len(w) == 2
    assert legacy_precision("SFTConfig", "bf16", bf16=None, dtype=None) == "bf16"
    with pytest.raises(ConfigError, match="conflicts with the deprecated"):
        legacy_precision("SFTConfig", "fp32", bf16=True, dtype=None)
    with pytest.raises(ConfigError, match="dtype='float16' is not supported"):
        legacy_precision("PPOConfig", "auto", bf16=None, dtype="float16")


def test_adamw_fused_for_plain_tensors_foreach_otherwise():
    model = tiny_llama(VOCAB, seed=0)
    opt = adamw(model.parameters(), lr=1e-3, betas=(0.8, 0.9), eps=1e-6)
    group = opt.param_groups[0]
    assert group["fused"] and group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
    # one step from the same gradients: the update of the reference single-tensor loop (later steps
    # drift apart through the loss like any two summation orders)
    ref = tiny_llama(VOCAB, seed=0)
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0,
                              foreach=False)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    for m, o in ((model, opt), (ref, plain)):
        _lm_loss(m, ids).backward()
        o.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=n)  # an update is 1e-3


def test_memory_plan_states_precision_and_checkpointing():
    from pathlib import Path

    from fastrlhf.engine.planner import PlanSpec, load_arch, plan_ppo, scheduler_plan
    arch = load_arch(str(Path(__file__).resolve().parents[2] / "examples" / "configs" / "qwen2.5-7b"))
    spec = PlanSpec(actor=arch, gpus=8, precision="bf16", gradient_checkpointing=True, offload="none")
    plan = scheduler_plan(plan_ppo(spec), device="cuda:0")
    text = plan.format()
    assert "bf16 compute, fp32 masters" in text and "activations checkpointed" in text
    n = arch.numel
    assert plan.bytes["actor.params"] + plan.bytes["actor.optim"] == 2 * -(-n * 4 // 8) + -(-n * 8 // 8)  # 16 B
    assert plan.bytes["ref.params"] == -(-n * 2 // 8)  # frozen in bf16
    cpu = PlanSpec(actor=arch, gpu_bytes=None, precision="fp32")
    assert "no checkpointing" in scheduler_plan(plan_ppo(cpu), device="cpu").format()

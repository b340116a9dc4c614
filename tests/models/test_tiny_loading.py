"""tiny_llama / tiny_gpt2 and load_causal_lm / load_tokenizer (local directories only, no downloads)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import load_causal_lm, load_tokenizer, resolve_dtype, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_tiny_models_are_deterministic_and_keep_token_ids(make):
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    a, b, c = make(37, seed=5, **ids), make(37, seed=5, **ids), make(37, seed=6, **ids)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert (a.config.pad_token_id, a.config.eos_token_id, a.config.bos_token_id) == (0, 1, 2)
    assert a.config.hidden_size // a.config.num_attention_heads >= 32
    assert a(torch.randint(0, 37, (2, 9))).logits.shape == (2, 9, 37)


def test_tiny_rejects_small_head_dim():
    with pytest.raises(ValueError, match="head dim 16"):
        tiny_llama(37, hidden_size=64, num_heads=4)


def test_tiny_does_not_touch_global_rng():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    tiny_gpt2(37)
    torch.testing.assert_close(torch.rand(3), want)


def test_load_causal_lm_and_tokenizer_from_local_dirs(tmp_path):
    tok = build_test_tokenizer()
    model = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    back = load_causal_lm(tmp_path)
    assert back.dtype == torch.float32
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert load_causal_lm(tmp_path, dtype="bf16").dtype == torch.bfloat16
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), type(model))
    t2 = load_tokenizer(tmp_path, padding_side="right")
    assert t2.padding_side == "right" and t2.pad_token_id == tok.pad_token_id
    assert t2("red cat").input_ids == tok("red cat").input_ids


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(tmp_path, padding_side="middle")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")

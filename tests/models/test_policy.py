"""PolicyWithLoss against the model's own logits: lm_head bias (Phi) and logit scaling (Granite, Cohere)."""
import pytest
import torch
import transformers

from fastrlhf.kernels import linear_token_logprobs, ppo_policy_loss
from fastrlhf.models import PolicyWithLoss


def _tiny(config_cls, model_cls, **extra):
    cfg = config_cls(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def _batch(prompt_len=3, total=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 97, (3, total), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 0] = 0  # a left-padded prompt
    return ids, attn, prompt_len


def _hf_logprobs(lm, ids, attn, prompt_len, temperature):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = lm(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double() / temperature
    lp = logits.log_softmax(-1)[:, prompt_len - 1 : -1].gather(-1, ids[:, prompt_len:, None])[..., 0]
    return lp.float()


@pytest.mark.parametrize("kind", ["granite", "cohere"])
def test_logprobs_match_the_models_own_scaled_logits(kind):
    if kind == "granite":
        lm = _tiny(transformers.GraniteConfig, transformers.GraniteForCausalLM, logits_scaling=8.0)
    else:
        lm = _tiny(transformers.CohereConfig, transformers.CohereForCausalLM, logit_scale=0.0625)
    ids, attn, p = _batch()
    policy = PolicyWithLoss(lm, temperature=0.7, backend="torch")
    with torch.no_grad():
        lp, _, _ = policy(ids, attn, mode="logprobs", prompt_len=p)
        ref = _hf_logprobs(lm, ids, attn, p, 0.7)
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-4)


def test_softcapping_is_refused_up_front():
    lm = _tiny(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, head_dim=32,
               final_logit_softcapping=30.0)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        PolicyWithLoss(lm)


def test_lm_head_bias_is_folded_into_the_fused_loss():
    lm = _tiny(transformers.PhiConfig, transformers.PhiForCausalLM)
    assert lm.get_output_embeddings().bias is not None
    with torch.no_grad():
        lm.get_output_embeddings().bias.normal_()  # a non-trivial bias
    ids, attn, p = _batch()
    mask = torch.ones(3, ids.shape[1] - p, dtype=torch.bool)
    mask[2, -2:] = False
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(mask.shape, generator=g) * 3
    adv = torch.randn(mask.shape, generator=g)
    policy = PolicyWithLoss(lm, backend="torch")
    loss, _, _ = policy(ids, attn, mode="loss", prompt_len=p, old_logprobs=old, advantages=adv, mask=mask)
    loss.backward()
    got_grad = lm.get_output_embeddings().bias.grad.clone()
    lm.zero_grad()
    # the unfused composition with the bias given to linear_token_logprobs
    hidden = policy._response_hidden(ids, attn, p)
    head = lm.get_output_embeddings()
    lp = linear_token_logprobs(hidden, head.weight, ids[:, p:], bias=head.bias, backend="torch")
    want, _ = ppo_policy_loss(lp, old, adv, mask)
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_grad, head.bias.grad, atol=1e-6, rtol=1e-5)

"""PPO with LoRA: adapters on actor and critic, no reference model (the actor with its adapters disabled),
exact resume from the DCP checkpoint, merged final export."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from fastrlhf.config import ConfigError  # noqa: E402
from fastrlhf.data import build_test_tokenizer  # noqa: E402
from fastrlhf.models import RewardModel, ValueModel, tiny_llama  # noqa: E402
from fastrlhf.models.policy import PolicyWithLoss  # noqa: E402
from fastrlhf.rollout.base import Generation  # noqa: E402
from fastrlhf.trainers.ppo import EarlyStopConfig, PPOConfig, PPOTrainer, RolloutConfig  # noqa: E402
from fastrlhf.trainers.ppo_batch import build_batch  # noqa: E402
from tests.trainers.helpers import FixedRollout, crash_and_resume, write_grpo_cli_run  # noqa: E402

PROMPTS = ["hello cat", "the big red dog is here", "what", "i like the small green bird"]
RESPONSES = [[20, 21, 1], [22], [23, 24, 25, 26], [27, 1]]


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def _lm(tok, seed):
    return tiny_llama(len(tok), seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def make(tmp_path, tok, *, ref=None, **overrides):
    torch.manual_seed(0)
    fields = dict(iterations=2, rollout_batch_size=4, minibatch_size=2, ppo_epochs=2, actor_lr=1e-2,
                  critic_lr=1e-2, checkpoint_every=1, reward_norm="running", kernel_backend="torch",
                  lora_rank=4, rollout=RolloutConfig(max_new_tokens=4),
                  early_stop=EarlyStopConfig(score_falling_iters=None, kl_factor=None, length_factor=None))
    fields.update(overrides)
    cfg = PPOConfig(**fields)
    critic = None if cfg.shared_critic else ValueModel(_lm(tok, 2))
    return PPOTrainer(cfg, actor=_lm(tok, 0), ref=ref, reward_model=RewardModel(_lm(tok, 1)), critic=critic,
                      tokenizer=tok, prompts=PROMPTS, rollout=FixedRollout(RESPONSES), output_dir=tmp_path)


def _batch(trainer):
    ids = [trainer.prompt_ids[i] for i in range(4)]
    return build_batch(ids, Generation(RESPONSES, [[-1.0] * len(r) for r in RESPONSES]),
                       pad_token_id=trainer.tokenizer.pad_token_id, device=torch.device("cpu"))


@pytest.mark.parametrize("shared_critic", [False, True])
def test_lora_ppo_trains_adapters_and_reference_is_the_base_model(tmp_path, tok, shared_critic):
    trainer = make(tmp_path, tok, shared_critic=shared_critic)
    assert trainer.ref is None and "ref.params" not in trainer.runtime.scheduler.plan.bytes  # none planned
    base = _lm(tok, 0)
    trainable = {n for n, p in trainer.actor.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    before = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
    trainer.train()
    after = dict(trainer.actor.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n)  # adapters learned
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)  # base frozen
    if not shared_critic:
        assert all("lora_" in n or n.startswith("head") for n, p in trainer.critic.named_parameters()
                   if p.requires_grad)

    # the reference log-probs are exactly the base model's; the actor's (adapters on) differ from them
    batch = _batch(trainer)
    trainer.score(batch)
    ref = PolicyWithLoss(base, temperature=1.0, backend="torch")
    want, _, _ = ref(batch.input_ids, batch.attention_mask, mode="logprobs", prompt_len=batch.prompt_len)
    m = batch.mask
    torch.testing.assert_close(batch.ref_logprobs[m], want[m], rtol=1e-5, atol=1e-5)
    assert (batch.old_logprobs[m] - batch.ref_logprobs[m]).abs().max() > 1e-4
    assert all(p.requires_grad for n, p in trainer.actor.named_parameters() if n in trainable)  # restored

    # final/: a plain HF model with the adapters merged (loads without peft), same logits as the actor
    from transformers import AutoModelForCausalLM
    final = trainer.save_final()
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora_" in k or "base_layer" in k for k in loaded.state_dict())
    ids = batch.input_ids[:, :]
    with torch.no_grad():
        got = loaded(ids, attention_mask=batch.attention_mask).logits
        lm = trainer.actor.lm
        was = lm.training
        lm.eval()
        exp = lm(ids, attention_mask=batch.attention_mask).logits
        lm.train(was)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(got[valid], exp[valid], rtol=1e-4, atol=1e-4)
    if not shared_critic:  # critic/: a plain ValueModel folder with the critic's adapters merged
        trainer.finish()
        critic = ValueModel.from_pretrained(tmp_path / "critic")
        assert not any("lora_" in k or "base_layer" in k for k in critic.state_dict())
        with torch.no_grad():
            trainer.critic.eval()
            want_v = trainer.critic(batch.input_ids, batch.attention_mask)
            got_v = critic.eval()(batch.input_ids, batch.attention_mask)
        torch.testing.assert_close(got_v[valid], want_v[valid], rtol=1e-4, atol=1e-4)


def _state(trainer):
    out = {f"actor.{k}": v for k, v in trainer.actor.state_dict().items()}
    out.update({f"critic.{k}": v for k, v in trainer.critic.state_dict().items()})
    return out


def test_lora_ppo_resume_after_crash_equals_uninterrupted_run(tmp_path, tok, monkeypatch):
    kw = dict(iterations=3)
    full = make(tmp_path / "a", tok, **kw)
    full.train()
    resumed = crash_and_resume(monkeypatch, lambda: make(tmp_path / "b", tok, **kw), at=2)
    assert len(resumed.train()) == 1
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in full.optimizers:  # adapters' (and heads') AdamW moments
        sa, sb = full.optimizers[name].state_dict()["state"], resumed.optimizers[name].state_dict()["state"]
        assert sa and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert full.kl_ctl.value == resumed.kl_ctl.value


def test_lora_ppo_config_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="pass ref=None"):
        make(tmp_path, tok, ref=_lm(tok, 0))
    with pytest.raises(ValueError, match="needs a ref model"):
        make(tmp_path, tok, lora_rank=0)
    with pytest.raises(ConfigError, match="lora_dropout must be 0 in PPO"):
        PPOConfig(lora_rank=4, lora_dropout=0.1)
    with pytest.raises(ConfigError, match="lora_rank must be >= 0"):
        PPOConfig(lora_rank=-1)
    with pytest.raises(ConfigError, match="lora_target_modules"):
        make(tmp_path, tok, lora_target_modules=("nonexistent_proj",))


def test_cli_ppo_with_lora_loads_no_reference_and_exports_merged(tmp_path, tok, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from fastrlhf.cli import main
    from fastrlhf.trainers import ppo_cli

    write_grpo_cli_run(tmp_path, _lm(tok, 0), tok, PROMPTS, lora_rank=4)
    loaded = {}
    real = ppo_cli.load_ppo_models
    monkeypatch.setattr(ppo_cli, "load_ppo_models",
                        lambda *a, **k: loaded.setdefault("models", real(*a, **k)))
    assert main(["ppo", "--config", str(tmp_path / "ppo.yaml")]) == 0
    assert loaded["models"][2] is None  # no reference model loaded
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert not any("lora_" in k or "base_layer" in k for k in final.state_dict())
    # under torchrun (2 ranks, FSDP2): tests/engine/test_lora_fsdp.py

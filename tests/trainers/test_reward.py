"""RewardTrainer / RewardConfig on a tiny Llama and the local test tokenizer (no downloads)."""
from __future__ import annotations

import json

import pytest
import torch

from fastrlhf.algo import bradley_terry_loss
from fastrlhf.config import ConfigError, load_config
from fastrlhf.data import DataError, build_test_tokenizer
from fastrlhf.models import RewardModel, tiny_gpt2, tiny_llama
from fastrlhf.telemetry.metrics import read_metrics
from fastrlhf.trainers.reward import (
    RewardConfig,
    RewardTrainer,
    accumulate_reward_gradients,
    pair_batch,
    score_pairs,
    pair_features,
)
from tests.trainers.helpers import good_bad_pairs

CPU = torch.device("cpu")


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """The chosen response has "good" where the rejected one has "bad", at a random position among
    random words: the reward model must find one token anywhere in the sequence."""
    return good_bad_pairs(n, seed, words=(2, 6))


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer(padding_side="right")


def _cfg(tmp_path, **kw):
    base = dict(model="unused", data="unused", output_dir=str(tmp_path), lr=3e-3, epochs=1, batch_size=32,
                micro_batch_size=16, max_length=32, progress=False, tensorboard=False, warmup_ratio=0.1)
    return RewardConfig(**{**base, **kw})


def _lm(tok, make=tiny_llama, seed=0):
    return make(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=seed)


def test_pair_features_end_with_eos_and_keep_margin(tok):
    f = pair_features({"prompt": "say hi", "chosen": "good dog", "rejected": "bad", "margin": 1.5}, tok, 32)
    assert tok.decode(f["chosen_input_ids"]) == "say hi good dog <eos>"
    assert tok.decode(f["rejected_input_ids"]) == "say hi bad <eos>"
    assert f["margin"] == 1.5
    assert pair_features({"prompt": "a", "chosen": "b", "rejected": "c"}, tok, 32)["margin"] == 0.0
    row = {"prompt": "say hi", "chosen": "good", "rejected": "bad"}
    chat = pair_features(row, tok, 32, chat_template=True)
    assert tok.decode(chat["chosen_input_ids"]) == "<|user|> say hi <|end|> <|assistant|> good <eos>"


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_accumulation_matches_one_batch_with_margins(tok, make):
    rows = synthetic_pairs(5, seed=3)
    for i, r in enumerate(rows):
        r["margin"] = 0.25 * i
    feats = [pair_features(r, tok, 32) for r in rows]
    m1, m2 = RewardModel(_lm(tok, make)).double(), RewardModel(_lm(tok, make)).double()
    m2.load_state_dict(m1.state_dict())  # same head (its init draws from the global RNG)
    one = accumulate_reward_gradients(m1, [pair_batch(feats, 0)], device=CPU)
    acc = accumulate_reward_gradients(m2, [pair_batch(feats[:2], 0), pair_batch(feats[2:], 0)], device=CPU)
    for k in ("loss", "accuracy", "margin"):
        torch.testing.assert_close(acc[k], one[k], atol=1e-6, rtol=0)
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-10, rtol=1e-8, msg=n)
    # The BT loss with per-pair margins, scored directly, is the accumulated loss.
    with torch.no_grad():
        b = pair_batch(feats, 0)
        s = m1(b["input_ids"], b["attention_mask"])
        want, _, _ = bradley_terry_loss(s[:5], s[5:], b["margin"].double())
    torch.testing.assert_close(one["loss"].double(), want.double(), atol=1e-6, rtol=0)


def test_reward_model_learns_synthetic_preference(tok, tmp_path):
    trainer = RewardTrainer(_cfg(tmp_path, epochs=2, eval_every=4), model=_lm(tok), tokenizer=tok,
                            train_rows=synthetic_pairs(128, 0), eval_rows=synthetic_pairs(64, 1))
    result = trainer.train()
    assert result["eval_accuracy"] > 0.9, result
    assert result["eval_on_train_pairs"] == 0.0  # a held-out set was given
    assert result["eval_margin"] > 0 and 0 <= result["eval_ece"] <= 1
    assert result["eval_chosen_mean"] > result["eval_rejected_mean"]
    assert (tmp_path / "reward_histogram.png").stat().st_size > 1000
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"loss", "accuracy", "margin", "grad_norm", "lr"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [4, 8]
    # The saved model scores like the trained one and carries its reward statistics.
    back = RewardModel.from_pretrained(tmp_path / "final")
    assert back.reward_mean == pytest.approx(result["reward_mean"])
    assert back.reward_std == pytest.approx(result["reward_std"]) and back.reward_std > 0
    b = pair_batch([pair_features(r, tok, 32) for r in synthetic_pairs(4, 9)], 0)
    torch.testing.assert_close(back(b["input_ids"], b["attention_mask"]),
                               trainer.model.cpu()(b["input_ids"], b["attention_mask"]), atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "rm_result.json").read_text())["eval_accuracy"] == result["eval_accuracy"]


def test_without_eval_set_final_metrics_use_train_pairs(tok, tmp_path):
    result = RewardTrainer(_cfg(tmp_path, max_steps=1), model=_lm(tok), tokenizer=tok,
                           train_rows=synthetic_pairs(8, 0)).train()
    assert result["eval_pairs"] == 8 and "train_loss" in result


def test_bad_rm_rows_name_file_and_line(tok, tmp_path):
    data = tmp_path / "prefs.jsonl"
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "margin": "big"}) + "\n")
    with pytest.raises(DataError, match=r"prefs\.jsonl, line 2.*margin"):
        RewardTrainer(_cfg(tmp_path / "out", data=str(data)), model=_lm(tok), tokenizer=tok)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="row index 0.*rejected"):
        RewardTrainer(_cfg(tmp_path / "out"), model=_lm(tok), tokenizer=tok,
                      train_rows=[{"prompt": "a", "chosen": "b"}])


def test_reward_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="chosen_key"):
        load_config(RewardConfig, None, ["model=m", "data=d", "output_dir=o", "chosen_key=x"])
    with pytest.raises(ConfigError, match="'output_dir' is required"):
        load_config(RewardConfig, None, ["model=m", "data=d"])
    cfg = load_config(RewardConfig, None, ["model=m", "data=d", "output_dir=o", "use_margin=false"])
    assert cfg.use_margin is False


@pytest.mark.gpu
def test_reward_trainer_bf16_on_cuda(tok, tmp_path):
    trainer = RewardTrainer(_cfg(tmp_path, epochs=2, device="cuda", bf16=True), model=_lm(tok), tokenizer=tok,
                            train_rows=synthetic_pairs(128, 0), eval_rows=synthetic_pairs(64, 1))
    result = trainer.train()
    assert result["eval_accuracy"] > 0.9, result
    back = RewardModel.from_pretrained(tmp_path / "final", device="cuda")
    b = pair_batch([pair_features(r, tok, 32) for r in synthetic_pairs(4, 9)], 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s = back(b["input_ids"].cuda(), b["attention_mask"].cuda())
    assert s.dtype == torch.float32 and torch.isfinite(s).all()


def test_multi_head_reward_model_learns_each_objective(tok, tmp_path):
    """ "helpful" pairs prefer "good" to "bad", "harmless" pairs "yes" to "no": each head learns its own."""
    from fastrlhf.models import MultiHeadRewardModel, load_head_model

    def rows(n, seed):
        out = []
        for i, r in enumerate(synthetic_pairs(n, seed)):
            if i % 2:
                r = {k: v.replace("good", "yes").replace("bad", "no") for k, v in r.items()}
            out.append({**r, "head": "harmless" if i % 2 else "helpful"})
        return out

    cfg = _cfg(tmp_path, epochs=3, heads=("helpful", "harmless"), head_weights=(1.0, 0.5))
    trainer = RewardTrainer(cfg, model=_lm(tok), tokenizer=tok, train_rows=rows(128, 0),
                            eval_rows=rows(64, 1))
    result = trainer.train()
    assert result["eval_accuracy_helpful"] > 0.9 and result["eval_accuracy_harmless"] > 0.9, result
    back = load_head_model(tmp_path / "final")
    assert isinstance(back, MultiHeadRewardModel) and back.heads == ["helpful", "harmless"]
    assert back.head_weights.tolist() == [1.0, 0.5] and back.reward_std > 0
    with pytest.raises(DataError, match="row index 0.*'head' must name one of"):
        RewardTrainer(cfg, model=_lm(tok), tokenizer=tok, train_rows=synthetic_pairs(4, 0))
    with pytest.raises(ConfigError, match="head_weights"):
        _cfg(tmp_path, heads=("a", "b"), head_weights=(1.0,))


def test_model_path_may_be_a_reward_model_checkpoint(tok, tmp_path):
    rm = RewardModel(_lm(tok))
    rm.save_pretrained(tmp_path / "rm0", tokenizer=tok)
    cfg = _cfg(tmp_path / "out", model=str(tmp_path / "rm0"))
    trainer = RewardTrainer(cfg, train_rows=synthetic_pairs(4, 0))
    assert type(trainer.model) is RewardModel
    for (n, a), (_, b) in zip(rm.state_dict().items(), trainer.model.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=n)


def test_resume_after_crash_matches_uninterrupted_run(tok, tmp_path, monkeypatch):
    rows = synthetic_pairs(24, 5)

    def trainer(out):
        cfg = _cfg(out, epochs=2, batch_size=8, micro_batch_size=4, save_every=2)
        return RewardTrainer(cfg, model=_lm(tok), tokenizer=tok, train_rows=rows, eval_rows=rows[:8])

    straight = trainer(tmp_path / "a").train()
    real, calls = RewardTrainer.train_step, {"n": 0}

    def crash_at_step_4(self, indices):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(self, indices)

    monkeypatch.setattr(RewardTrainer, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "b").train()
    monkeypatch.setattr(RewardTrainer, "train_step", real)
    assert trainer(tmp_path / "b").train() == straight
    a = RewardModel.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = RewardModel.from_pretrained(tmp_path / "b" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)


def test_without_eval_data_the_result_says_it_was_measured_on_train_pairs(tok, tmp_path, capsys):
    result = RewardTrainer(_cfg(tmp_path, max_steps=1), model=_lm(tok), tokenizer=tok,
                           train_rows=synthetic_pairs(16, 0)).train()
    assert result["eval_on_train_pairs"] == 1.0
    assert "measured on the training pairs" in capsys.readouterr().out


def test_lora_reward_model_trains_head_fully_and_saves_merged(tok, tmp_path):
    trainer = RewardTrainer(_cfg(tmp_path, epochs=2, lora_rank=4, lr=1e-2), model=_lm(tok), tokenizer=tok,
                            train_rows=synthetic_pairs(64, 0), eval_rows=synthetic_pairs(32, 1))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and all(n == "head.weight" or "lora_" in n for n in trainable)
    result = trainer.train()
    assert result["eval_accuracy"] > 0.7, result
    back = RewardModel.from_pretrained(tmp_path / "final")  # merged: loads without peft
    b = pair_batch([pair_features(r, tok, 32) for r in synthetic_pairs(4, 9)], 0)
    torch.testing.assert_close(back(b["input_ids"], b["attention_mask"]),
                               trainer.model.cpu()(b["input_ids"], b["attention_mask"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_packed_pair_batches_train_like_padded_ones(tok, tmp_path, make):
    """``packing`` (the default) scores the valid tokens packed: per-step losses, accuracy and the final
    weights equal the padded run's (fp32), with ragged pair lengths and GPT-2's absolute positions."""
    runs = {}
    for packing in (True, False):
        out = tmp_path / f"packing{packing}"
        trainer = RewardTrainer(_cfg(out, packing=packing, max_steps=3, batch_size=16, micro_batch_size=8),
                                model=_lm(tok, make), tokenizer=tok, train_rows=synthetic_pairs(48, 3))
        trainer.train()
        runs[packing] = ([r for r in read_metrics(out / "metrics.jsonl") if "loss" in r], trainer.model.cpu())
    (packed, m_packed), (padded, m_padded) = runs[True], runs[False]
    assert len(packed) == len(padded) == 3
    for a, b in zip(packed, padded, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]
    # The trained models agree as reward models: chosen-minus-rejected margins on new pairs. (Not weight by
    # weight: the final LayerNorm's bias shifts chosen and rejected alike, so its BT gradient is exactly 0
    # and AdamW turns the rounding noise there into lr-sized steps that differ run to run.)
    b = pair_batch([pair_features(r, tok, 32) for r in synthetic_pairs(16, 11)], tok.pad_token_id)
    margins = [torch.sub(*score_pairs(m, b, device=torch.device("cpu"))) for m in (m_packed, m_padded)]
    torch.testing.assert_close(margins[0], margins[1], atol=1e-4, rtol=1e-4)
    assert packed[0]["loss"] != pytest.approx(packed[-1]["loss"], rel=1e-6)  # it trained


def test_token_budget_micro_batches_train_like_row_micro_batches(tok, tmp_path):
    """``max_tokens_per_micro_batch`` groups pairs by tokens; the losses (weighted by pair shares) match."""
    runs = {}
    for name, kw in (("rows", {}), ("tokens", {"max_tokens_per_micro_batch": 64})):
        out = tmp_path / name
        trainer = RewardTrainer(_cfg(out, max_steps=2, batch_size=16, micro_batch_size=8, **kw),
                                model=_lm(tok), tokenizer=tok, train_rows=synthetic_pairs(32, 5))
        groups = trainer.micro_batches([trainer.train_features[i] for i in range(16)])
        runs[name] = ([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
                      if trainer.train() is not None else None, len(groups))
    assert runs["tokens"][1] > runs["rows"][1] == 2  # the budget made more, smaller micro-batches
    assert runs["tokens"][0] == pytest.approx(runs["rows"][0], rel=1e-5)
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch must be >= 2 \\* max_length"):
        _cfg(tmp_path, max_tokens_per_micro_batch=40)

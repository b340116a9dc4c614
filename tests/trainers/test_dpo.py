"""DPOTrainer / DPOConfig / `fastrlhf dpo` on a tiny Llama and the local test tokenizer (no downloads)."""
from __future__ import annotations

import json

import pytest
import torch

from fastrlhf.algo import dpo_loss
from fastrlhf.cli import main
from fastrlhf.config import ConfigError
from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import tiny_llama
from fastrlhf.trainers.dpo import REF_CACHE, DPOConfig, DPOTrainer, dpo_batch, dpo_pair_features, sequence_logps
from tests.trainers.helpers import good_bad_pairs



def pairs(n: int, seed: int) -> list[dict]:
    """Chosen has "good" where rejected has "bad"."""
    return good_bad_pairs(n, seed, words=(1, 4))


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer(padding_side="right")


def _lm(tok, seed=0):
    return tiny_llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=seed)


def _cfg(out, **kw):
    base = dict(model="unused", data="unused", output_dir=str(out), lr=2e-3, epochs=1, batch_size=16,
                micro_batch_size=8, max_length=32, progress=False, tensorboard=False, warmup_ratio=0.0,
                beta=0.5, lr_scheduler="constant")
    return DPOConfig(**{**base, **kw})


def test_sequence_logps_match_logits(tok):
    model = _lm(tok).double().eval()
    feats = [dpo_pair_features(r, tok, 32) for r in pairs(3, 0)]
    batch = dpo_batch(feats, tok.pad_token_id)
    with torch.no_grad():
        lp, n = sequence_logps(model, batch, backend="torch")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    per_tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want = torch.where(labels != -100, per_tok, 0.0).sum(-1)
    torch.testing.assert_close(lp.double(), want, rtol=1e-6, atol=1e-6)
    # chosen rows first, then rejected; response tokens = response + EOS
    assert n.shape == (6,)
    assert int(n[0]) == len(feats[0]["chosen_input_ids"]) - feats[0]["chosen_labels"].count(-100)


def test_dpo_learns_preference_and_caches_reference_once(tok, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = DPOTrainer._score_all

    def counting(self, model, features):
        calls["n"] += 1
        return real(self, model, features)

    monkeypatch.setattr(DPOTrainer, "_score_all", counting)
    model = _lm(tok)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = DPOTrainer(_cfg(tmp_path, epochs=3), model=model, tokenizer=tok, train_rows=pairs(64, 0),
                         eval_rows=pairs(32, 1))
    assert calls["n"] == 2  # train and eval pairs, once, before any step
    ref = trainer.ref_logps
    # the cached reference is the starting policy's log-probs
    fresh = _lm(tok)
    fresh.load_state_dict(start)
    (mb,) = trainer.micro_batches(trainer.eval_features[:4])
    with torch.no_grad():
        lp, _ = sequence_logps(fresh.eval(), mb)
    torch.testing.assert_close(ref["eval"][:4], lp.view(2, -1).T, rtol=1e-5, atol=1e-5)
    before = trainer.evaluate()
    result = trainer.train()
    assert calls["n"] == 2  # training never recomputes the reference
    assert before["eval_loss"] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-4)
    assert result["eval_reward_accuracy"] > 0.9 and result["eval_reward_margin"] > 0, result
    assert result["eval_loss"] < before["eval_loss"] - 0.2
    assert (tmp_path / REF_CACHE).is_file() and (tmp_path / "final" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "reward_accuracy", "reward_margin", "grad_norm"} <= set(rows[0])
    # a re-run reuses the cache and the finished result
    again = DPOTrainer(_cfg(tmp_path, epochs=3), model=_lm(tok), tokenizer=tok, train_rows=pairs(64, 0),
                       eval_rows=pairs(32, 1))
    assert calls["n"] == 2 and again.train() == result


@pytest.mark.parametrize("gpt2", [False, True])
def test_packed_sequence_logps_equal_padded(tok, gpt2):
    """Packed rows (valid tokens only, block-causal attention, positions restarting per row) give the
    padded path's per-row sums, with right and left padding, RoPE (Llama) and learned positions (GPT-2)."""
    from fastrlhf.data import pad_batch
    from fastrlhf.models import tiny_gpt2
    model = (tiny_gpt2(len(tok), seed=0) if gpt2 else _lm(tok)).double().eval()
    feats = [dpo_pair_features(r, tok, 32) for r in pairs(5, 4)]
    batch = dpo_batch(feats, tok.pad_token_id)
    seqs = [{k: f[f"{side}_{k}"] for k in ("input_ids", "labels", "attention_mask")}
            for side in ("chosen", "rejected") for f in feats]
    left = pad_batch(seqs, tok.pad_token_id, padding_side="left")
    assert (batch["attention_mask"] == 0).any() and (left["attention_mask"][:, 0] == 0).any()  # real padding
    with torch.no_grad():
        want, n_want = sequence_logps(model, batch, backend="torch")
        for b in (batch, left):
            got, n_got = sequence_logps(model, b, backend="torch", packing=True)
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-9, atol=1e-9)
            assert torch.equal(n_got, n_want)


@pytest.mark.parametrize("packing", [False, True])
def test_train_step_accumulation_matches_one_batch(tok, tmp_path, packing):
    """One micro-batch of six pairs, micro-batches of two, or micro-batches by a token budget (pairs not
    consecutive): the same loss and gradient, packed or padded."""
    rows = pairs(6, 3)
    grads = []
    side = max(len(f[k]) for f in [dpo_pair_features(r, tok, 32) for r in rows]
               for k in ("chosen_input_ids", "rejected_input_ids"))
    for name, kw in (("one", dict(micro_batch_size=6)), ("two", dict(micro_batch_size=2)),
                     ("tokens", dict(max_length=side, max_tokens_per_micro_batch=2 * side))):
        model = _lm(tok).double()
        tr = DPOTrainer(_cfg(tmp_path / name, batch_size=6, label_smoothing=0.1, packing=packing, **kw),
                        model=model, tokenizer=tok, train_rows=rows)
        if name == "tokens":
            groups = tr.micro_rows(tr.train_features)
            assert len(groups) > 1 and sorted(i for g in groups for i in g) == list(range(6))
        model.train()
        for k in range(len(rows)):  # perturb the reference so the loss is not at its symmetric point
            tr.ref_logps["train"][k] += torch.tensor([0.3 * k, -0.2])
        tr.model.zero_grad()
        seen = []
        tr.optimizer_step = lambda: seen.append([p.grad.clone() for p in tr.model.parameters()]) or {}
        stats = tr.train_step(list(range(6)))
        grads.append((stats["loss"], seen[0], tr.ref_logps["train"].clone()))
    for other in grads[1:]:
        torch.testing.assert_close(other[2], grads[0][2], rtol=1e-9, atol=1e-9)  # reference, in pair order
        torch.testing.assert_close(other[0], grads[0][0], rtol=1e-6, atol=1e-7)
        for a, b in zip(grads[0][1], other[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_token_budget_must_hold_a_pair(tmp_path):
    with pytest.raises(ConfigError, match=r"both sides of a pair: it must be >= 2 \* max_length = 64, got 40"):
        _cfg(tmp_path, max_tokens_per_micro_batch=40)


def test_simpo_needs_no_reference_and_learns(tok, tmp_path):
    trainer = DPOTrainer(_cfg(tmp_path, loss_type="simpo", beta=2.0, simpo_gamma=0.2, epochs=3), model=_lm(tok),
                         tokenizer=tok, train_rows=pairs(64, 0), eval_rows=pairs(32, 1))
    assert trainer.ref_logps is None and not (tmp_path / REF_CACHE).exists()
    result = trainer.train()
    assert result["eval_reward_accuracy"] > 0.9, result


def test_loss_matches_dpo_loss_ipo(tok, tmp_path):
    rows = pairs(4, 7)
    tr = DPOTrainer(_cfg(tmp_path, loss_type="ipo"), model=_lm(tok), tokenizer=tok, train_rows=rows, eval_rows=rows)
    (mb,) = tr.micro_batches(tr.eval_features)
    with torch.no_grad():
        lp, _ = sequence_logps(tr.model.eval(), mb)
    want, _ = dpo_loss(lp[:4], lp[4:], tr.ref_logps["eval"][:, 0], tr.ref_logps["eval"][:, 1], beta=0.5,
                       loss_type="ipo")
    assert tr.evaluate()["eval_loss"] == pytest.approx(float(want), rel=1e-5)
    assert float(want) == pytest.approx(1.0, abs=1e-3)  # z = 0 at the start: (0 - 1/(2*0.5))^2


def test_config_errors():
    base = dict(model="m", data="d", output_dir="o")
    with pytest.raises(ConfigError, match="loss_type must be one of"):
        DPOConfig(**base, loss_type="kto")
    with pytest.raises(ConfigError, match="not ipo"):
        DPOConfig(**base, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="beta must be > 0"):
        DPOConfig(**base, beta=0.0)


def test_cli_dpo(tok, tmp_path, capsys):
    _lm(tok).save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(8, 0)))
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"model: {tmp_path / 'sft'}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "batch_size: 4\nmicro_batch_size: 4\nmax_length: 32\nprogress: false\ntensorboard: false\n")
    assert main(["dpo", "--config", str(cfg), "max_steps=2"]) == 0
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["dpo", "--config", str(cfg), "loss_type=kto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastrlhf dpo: error:") and "loss_type" in err[0]
    data.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    assert main(["dpo", "--config", str(cfg), "output_dir=" + str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefs.jsonl" in err[0] and "line 1" in err[0]


def test_overlong_pairs_are_dropped_not_cut(tok, tmp_path, capsys):
    rows = pairs(8, 0) + [{"prompt": "say cat", "chosen": " ".join(["dog"] * 40), "rejected": "bad"}]
    tr = DPOTrainer(_cfg(tmp_path), model=_lm(tok), tokenizer=tok, train_rows=rows)
    assert len(tr.train_features) == 8 and "max_length" in capsys.readouterr().out
    from fastrlhf.data import DataError
    with pytest.raises(DataError, match="row index 8.*max_length=32"):
        DPOTrainer(_cfg(tmp_path / "b", drop_overlong=False), model=_lm(tok), tokenizer=tok, train_rows=rows)

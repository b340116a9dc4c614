"""SFTTrainer / SFTConfig on a tiny Llama / GPT-2 and the local test tokenizer (no downloads)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastrlhf.config import ConfigError, load_config
from fastrlhf.data import IGNORE_INDEX, DataError, build_test_tokenizer
from fastrlhf.models import tiny_gpt2, tiny_llama
from fastrlhf.telemetry.metrics import read_metrics
from fastrlhf.trainers.sft import (
    SFTConfig,
    SFTTrainer,
    accumulate_sft_gradients,
    collate,
    pack_features,
    response_nll_sum,
    sft_row_features,
)

CPU = torch.device("cpu")
ROWS = [
    {"prompt": "count 1 2 3", "response": "4 5 6 7 8 9"},
    {"prompt": "what is red", "response": "red"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello you"},
                  {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "yes good"}]},
    {"prompt": "say a big cat", "response": "a big cat ."},
    {"prompt": "add 2 and 3", "response": "5"},
]


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer(padding_side="right")


def _model(tok, make=tiny_llama, seed=0):
    return make(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=seed)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _cfg(tmp_path, **kw):
    base = dict(model="unused", data="unused", output_dir=str(tmp_path), lr=3e-3, epochs=1, batch_size=4,
                micro_batch_size=2, max_length=48, progress=False, tensorboard=False, warmup_ratio=0.0)
    return SFTConfig(**{**base, **kw})


def test_labels_cover_only_responses_and_assistant_turns(tok):
    pair = sft_row_features(ROWS[0], tok, 48)
    labelled = [t for t in pair["labels"] if t != IGNORE_INDEX]
    assert tok.decode(labelled) == "4 5 6 7 8 9 <eos>"
    chat = sft_row_features(ROWS[2], tok, 48)
    pairs = zip(chat["input_ids"], chat["labels"], strict=True)
    labelled = [t if y != IGNORE_INDEX else None for t, y in pairs]
    spans, cur = [], []
    for t in labelled + [None]:
        if t is None and cur:
            spans.append(tok.decode(cur))
            cur = []
        elif t is not None:
            cur.append(t)
    assert spans == ["hello you <|end|>", "yes good <|end|>"]


def test_chat_template_option_wraps_prompts(tok):
    plain = sft_row_features(ROWS[1], tok, 48)
    chat = sft_row_features(ROWS[1], tok, 48, chat_template=True)
    assert tok.decode(plain["input_ids"]) == "what is red red <eos>"
    assert tok.decode(chat["input_ids"]) == "<|user|> what is red <|end|> <|assistant|> red <eos>"
    def answer(f):
        return [t for t in f["labels"] if t != IGNORE_INDEX]

    assert answer(chat) == answer(plain)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_gradient_accumulation_invariance(tok, make):
    """Two micro-batches of uneven length give the same loss and grads as one batch (float64 model)."""
    feats = [sft_row_features(r, tok, 48) for r in ROWS[:4]]
    m1, m2 = _model(tok, make).double(), _model(tok, make).double()
    loss_one, n_one = accumulate_sft_gradients(m1, [collate(feats, tok.pad_token_id)], device=CPU)
    micro = [collate(feats[:1], tok.pad_token_id), collate(feats[1:], tok.pad_token_id)]
    loss_acc, n_acc = accumulate_sft_gradients(m2, micro, device=CPU)
    assert n_one == n_acc == sum(sum(t != IGNORE_INDEX for t in f["labels"][1:]) for f in feats)
    torch.testing.assert_close(loss_acc, loss_one, atol=1e-6, rtol=0)
    g1, g2 = _grads(m1), _grads(m2)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-10, rtol=1e-8)
    # The test can fail: a mean of per-micro-batch means is a different number here.
    with torch.no_grad():
        means = [response_nll_sum(m1, mb) for mb in micro]
    mean_of_means = sum(s / n for s, n in means) / len(means)
    assert abs(float(mean_of_means) - float(loss_one)) > 1e-5


def test_fused_and_logits_losses_agree(tok):
    feats = [sft_row_features(r, tok, 48) for r in ROWS]
    batch = [collate(feats, tok.pad_token_id)]
    m1, m2 = _model(tok), _model(tok)
    l1, _ = accumulate_sft_gradients(m1, batch, device=CPU, loss_impl="fused")
    l2, _ = accumulate_sft_gradients(m2, batch, device=CPU, loss_impl="logits")
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    g1, g2 = _grads(m1), _grads(m2)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_gives_the_unpacked_loss(tok, make, attn):
    feats = [sft_row_features(r, tok, 48) for r in ROWS]
    packed = pack_features(feats, max_length=30)
    assert len(packed) < len(feats) and all(len(p["input_ids"]) <= 30 for p in packed)
    model = _model(tok, make).double()
    model.set_attn_implementation(attn)
    s_plain, n_plain = response_nll_sum(model, collate(feats, tok.pad_token_id))
    s_pack, n_pack = response_nll_sum(model, collate(packed, tok.pad_token_id, model.config, torch.float64))
    assert int(n_plain) == int(n_pack)
    torch.testing.assert_close(s_pack, s_plain, atol=1e-9, rtol=1e-9)


def test_train_end_to_end_and_checkpoint_loads(tok, tmp_path):
    model = _model(tok)
    cfg = _cfg(tmp_path, epochs=4, eval_every=2, lr_scheduler="linear", warmup_ratio=0.2)
    trainer = SFTTrainer(cfg, model=model, tokenizer=tok, train_rows=ROWS * 2, eval_rows=ROWS)
    result = trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert train_rows[0]["lr"] == 0.0 and train_rows[-1]["loss"] < train_rows[0]["loss"]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert result["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert AutoTokenizer.from_pretrained(tmp_path / "final").pad_token_id == tok.pad_token_id
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert json.loads((tmp_path / "sft_result.json").read_text())["eval_loss"] == result["eval_loss"]


def test_resume_after_crash_matches_uninterrupted_run(tok, tmp_path, monkeypatch):
    kw = dict(epochs=2, save_every=2, micro_batch_size=3)
    def trainer(out, model, **extra):
        return SFTTrainer(_cfg(out, **kw, **extra), model=model, tokenizer=tok, train_rows=ROWS)

    straight = trainer(tmp_path / "a", _model(tok)).train()

    calls = {"n": 0}
    real = SFTTrainer.train_step

    def crash_at_step_3(self, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(self, indices)

    monkeypatch.setattr(SFTTrainer, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "b", _model(tok)).train()
    monkeypatch.setattr(SFTTrainer, "train_step", real)
    # A changed config refuses to resume into the crashed run's directory.
    with pytest.raises(ConfigError, match="different config.*lr"):
        trainer(tmp_path / "b", _model(tok), lr=1e-4).train()
    # A fresh process would rebuild the model from scratch; the checkpoint supplies the trained weights.
    resumed_model = _model(tok, seed=7)
    resumed = trainer(tmp_path / "b", resumed_model).train()
    assert resumed["train_loss"] == straight["train_loss"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    # A finished run returns its recorded result; its step checkpoints are gone (the final model stays).
    assert trainer(tmp_path / "b", _model(tok)).train() == resumed
    assert not (tmp_path / "b" / "checkpoints").exists() and (tmp_path / "b" / "final").is_dir()


def test_finished_run_is_not_reused_under_another_config(tok, tmp_path):
    first = SFTTrainer(_cfg(tmp_path, epochs=1), model=_model(tok), tokenizer=tok, train_rows=ROWS).train()
    again = SFTTrainer(_cfg(tmp_path, epochs=1), model=_model(tok), tokenizer=tok, train_rows=ROWS).train()
    assert again == first  # same command: the finished result
    with pytest.raises(ConfigError, match="different config.*lr"):
        SFTTrainer(_cfg(tmp_path, epochs=1, lr=5e-2), model=_model(tok), tokenizer=tok, train_rows=ROWS).train()


def test_non_finite_gradient_stops_before_anything_is_applied(tok, tmp_path, monkeypatch):
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = SFTTrainer.train_step

    def poisoned(self, indices):
        for p in self.model.parameters():  # an overflow somewhere in the backward pass
            p.register_hook(lambda g: g * float("inf"))
        return real(self, indices)

    monkeypatch.setattr(SFTTrainer, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm.*step 1"):
        SFTTrainer(_cfg(tmp_path), model=model, tokenizer=tok, train_rows=ROWS).train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "final").exists()


def test_max_length_beyond_the_models_positions_is_refused(tok, tmp_path):
    short = tiny_gpt2(len(tok), max_position_embeddings=32, pad_token_id=tok.pad_token_id)
    with pytest.raises(ConfigError, match="max_length=48 exceeds the model's 32 positions"):
        SFTTrainer(_cfg(tmp_path), model=short, tokenizer=tok, train_rows=ROWS).train()


def test_rows_rejected_at_tokenization_name_their_jsonl_line(tok, tmp_path):
    long_prompt = " ".join(["cat"] * 60)
    lines = ['{"prompt": "hello", "response": "cat dog"}', "", "",
             '{"prompt": "hi", "response": "dog"}', json.dumps({"prompt": long_prompt, "response": "cat"})]
    data = tmp_path / "blank.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path / "out", data=str(data), drop_overlong=False)
    with pytest.raises(DataError, match=r"blank\.jsonl, line 5: .*max_length"):
        SFTTrainer(cfg, model=_model(tok), tokenizer=tok).train()


def test_bad_rows_stop_before_training(tok, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    cfg = _cfg(tmp_path / "out", data=str(data))
    with pytest.raises(DataError, match=r"train\.jsonl, line 2.*response"):
        SFTTrainer(cfg, model=_model(tok), tokenizer=tok)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="row index 1"):
        SFTTrainer(cfg, model=_model(tok), tokenizer=tok, train_rows=[ROWS[0], {"messages": []}])


def test_overlong_rows_dropped_or_rejected(tok, tmp_path, capsys):
    long_prompt = {"prompt": " ".join(["cat"] * 40), "response": "dog"}
    SFTTrainer(_cfg(tmp_path, max_length=20, max_steps=1), model=_model(tok), tokenizer=tok,
               train_rows=ROWS + [long_prompt])
    assert "dropped 1 of 6 rows" in capsys.readouterr().out
    with pytest.raises(DataError, match="row index 5.*max_length"):
        SFTTrainer(_cfg(tmp_path, max_length=20, drop_overlong=False), model=_model(tok), tokenizer=tok,
                   train_rows=ROWS + [long_prompt])


def test_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\noutput_dir: o\nlearning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(SFTConfig, path)
    path.write_text("model: m\ndata: d\noutput_dir: o\n")
    assert load_config(SFTConfig, path, ["lr=2e-5", "epochs=3"]).lr == 2e-5
    with pytest.raises(ConfigError, match="'data' is required"):
        load_config(SFTConfig, None, ["model=m", "output_dir=o"])
    with pytest.raises(ConfigError, match="lr_scheduler"):
        load_config(SFTConfig, path, ["lr_scheduler=step"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(SFTConfig, path, ["micro_batch_size=0"])


@pytest.mark.gpu
@pytest.mark.parametrize("loss_impl", ["fused", "logits"])
def test_sft_bf16_autocast_on_cuda(tok, tmp_path, loss_impl):
    """bf16 autocast on CUDA: fp32 master weights, first-step loss = the fp32 CPU loss, the loss falls."""
    feats = [sft_row_features(r, tok, 48) for r in ROWS]
    batch = [collate(feats, tok.pad_token_id)]
    cpu_loss, _ = accumulate_sft_gradients(_model(tok), batch, device=CPU, loss_impl="logits")
    model = _model(tok).cuda()
    gpu_loss, _ = accumulate_sft_gradients(model, batch, device=torch.device("cuda"), bf16=True,
                                           loss_impl=loss_impl)
    assert gpu_loss.dtype == torch.float32
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=0.05, rtol=0.02)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    cfg = _cfg(tmp_path, epochs=6, device="cuda", bf16=True, loss_impl=loss_impl)
    SFTTrainer(cfg, model=_model(tok), tokenizer=tok, train_rows=ROWS, eval_rows=ROWS).train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final").dtype == torch.float32


def test_lora_sft_trains_adapters_exports_merged_and_resumes(tok, tmp_path):
    base = _model(tok)
    model = _model(tok)
    cfg = _cfg(tmp_path, epochs=3, lora_rank=4, lora_alpha=8.0, save_every=2, lr=2e-2)
    trainer = SFTTrainer(cfg, model=model, tokenizer=tok, train_rows=ROWS * 2)
    trainer.train()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for name, p in model.named_parameters():  # only adapters moved
        if "lora_" not in name:
            torch.testing.assert_close(p, base.get_parameter(name.replace(".base_layer", "")))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # plain HF, adapters merged
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        assert (back(ids).logits - base(ids).logits).abs().max() > 1e-3
    assert (tmp_path / "final" / "adapter.safetensors").is_file()
    fresh = SFTTrainer(cfg, model=_model(tok), tokenizer=tok, train_rows=ROWS * 2)
    fresh.load_model(tmp_path / "final")  # resume path: adapters back into an adapted model
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="lora_target_modules"):
        SFTTrainer(_cfg(tmp_path / "bad", lora_rank=2, lora_target_modules=("nope",)), model=_model(tok),
                   tokenizer=tok, train_rows=ROWS)


def test_token_budget_micro_batches_train_like_row_micro_batches(tok, tmp_path):
    """``max_tokens_per_micro_batch`` groups sequences by tokens; the loss is normalized over the global
    response tokens, so per-step losses equal the row micro-batches' (fp32)."""
    runs = {}
    for name, kw in (("rows", {}), ("tokens", {"max_tokens_per_micro_batch": 48})):
        out = tmp_path / name
        trainer = SFTTrainer(_cfg(out, epochs=2, batch_size=8, micro_batch_size=8, packing=False, **kw),
                             model=_model(tok), tokenizer=tok, train_rows=ROWS * 2)
        groups = len(trainer.micro_batches(trainer.train_features[:8]))
        trainer.train()
        runs[name] = ([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r], groups)
    assert runs["tokens"][1] > runs["rows"][1] == 1  # the budget made more, smaller micro-batches
    assert len(runs["rows"][0]) >= 2 and runs["tokens"][0] == pytest.approx(runs["rows"][0], rel=1e-5)
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch must be >= max_length=48"):
        _cfg(tmp_path, max_tokens_per_micro_batch=40)

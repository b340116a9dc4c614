"""Issue 9 ("Trust"): resume only the same run, never unpickle code, survive bad rows, one-line errors."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from fastrlhf.config import ConfigError
from fastrlhf.trainers import common


class _Boom:
    """Unpickling this runs code (writes a marker file): what a planted trainer_state.pt would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_trainer_state_round_trips_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = common.build_optimizer(model, lr=1e-3)
    sched = common.build_scheduler(opt, "cosine", num_training_steps=10, warmup_ratio=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    common.set_seed(5)
    common.save_trainer_state(tmp_path, step=3, optimizer=opt, scheduler=sched, extra={"kl": {"value": 0.1}})
    expected = (__import__("random").random(), __import__("numpy").random.rand(), torch.rand(()))
    common.set_seed(99)
    raw = torch.load(tmp_path / common.TRAINER_STATE, weights_only=True)  # plain tensors and numbers only
    assert raw["step"] == 3
    opt2 = common.build_optimizer(model, lr=1e-3)
    state = common.load_trainer_state(tmp_path, optimizer=opt2)
    assert state["extra"] == {"kl": {"value": 0.1}}
    got = (__import__("random").random(), __import__("numpy").random.rand(), torch.rand(()))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state_dict()["state"][0][k]))


def test_planted_pickle_in_trainer_state_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    with open(ckpt / common.TRAINER_STATE, "wb") as f:
        pickle.dump({"step": 1, "rng": _Boom(str(marker))}, f)
    with pytest.raises(ConfigError, match="refusing to load"):
        common.load_trainer_state(ckpt)
    assert not marker.exists()


# ------------------------------------------------------------------------------ 1. config drift
from fastrlhf.data import build_test_tokenizer  # noqa: E402
from fastrlhf.trainers.ppo import KLConfig  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def _ppo_tests():
    """tests/trainers/test_ppo.py as a module (its tiny trainer and fixed rollout; importlib mode)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_ppo_tests", Path(__file__).with_name("test_ppo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PPO_TESTS = []


def PPO_tests():  # noqa: N802
    if not _PPO_TESTS:  # loaded on first use: spawned workers below import this file too
        _PPO_TESTS.append(_ppo_tests())
    return _PPO_TESTS[0]


def _ppo(tmp_path, tok, **kw):
    return PPO_tests().make_trainer(tmp_path, tok, **kw)


def test_ppo_writes_its_config_and_refuses_another(tmp_path, tok):
    _ppo(tmp_path, tok, iterations=1).train()
    saved = json.loads((tmp_path / "ppo_config.json").read_text())
    assert saved["actor_lr"] == 1e-3 and saved["kl"]["target"] == 6.0
    with pytest.raises(ConfigError, match=r"different config \(keys \['actor_lr', 'kl.target'\]\)"):
        _ppo(tmp_path, tok, iterations=1, actor_lr=5e-4, kl=KLConfig(target=3.0))
    # bookkeeping keys may differ: this resumes (nothing left to do)
    assert _ppo(tmp_path, tok, iterations=1, progress=False, keep_checkpoints=5).train() == []


def test_demo_refuses_an_out_folder_of_another_seed_or_size(tmp_path, monkeypatch, capsys):
    from fastrlhf import cli, demo

    def no_training(*a, **k):
        raise AssertionError("the demo must refuse before training")

    monkeypatch.setattr(demo, "stage_sft", no_training)
    demo.check_demo_run(tmp_path, seed=0, quick=True, rollout="hf")
    assert json.loads((tmp_path / "demo_run.json").read_text()) == {"seed": 0, "quick": True, "rollout": "hf", "lora": False}
    assert cli.main(["demo", "--out", str(tmp_path), "--quick", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastrlhf demo: error:" in err and "--seed 0" in err
    assert cli.main(["demo", "--out", str(tmp_path), "--seed", "0"]) == 2  # not --quick
    assert "'quick'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 3. non-finite rewards
class _SomeNaN(torch.nn.Module):
    """A reward model that gives NaN for the first row of every batch (25% of a batch of 4)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        s = self.inner(input_ids, attention_mask).clone()
        s[0] = float("nan")
        return s


def test_non_finite_reward_rows_are_dropped_and_the_rest_trains(tmp_path, tok, capsys):
    from fastrlhf.models import RewardModel, tiny_llama

    rm = RewardModel(tiny_llama(len(tok), seed=1))
    trainer = _ppo(tmp_path, tok, reward_model=_SomeNaN(rm), iterations=2)
    before = {k: v.clone() for k, v in trainer.actor.state_dict().items()}
    rows = trainer.train()
    assert [r["dropped_rows"] for r in rows] == [1.0, 1.0]
    assert all(math.isfinite(r["rm_score"]) and math.isfinite(r["kl"]) for r in rows)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.actor.state_dict().items())  # it trained
    assert capsys.readouterr().out.count("non-finite reward") == 1  # warned once


def test_too_many_non_finite_rows_stop_the_run(tmp_path, tok):
    from fastrlhf.config import RunError
    from fastrlhf.models import RewardModel, tiny_llama

    rm = RewardModel(tiny_llama(len(tok), seed=1))
    trainer = _ppo(tmp_path, tok, reward_model=_SomeNaN(rm), iterations=3, max_nonfinite_share=0.2)
    with pytest.raises(RunError, match=r"non-finite reward scores: 1 of 4 rows .*max_nonfinite_share=0.2"):
        trainer.train()


# ------------------------------------------------------------------------------ 7. metrics across ranks
def _reduce_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from fastrlhf.trainers.ppo import reduce_metrics

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])][rank]  # unequal kept rows per rank
    metrics = {"rm_score": scores.mean(), "rm_score_sq": (scores * scores).mean(),
               "rm_score_n": torch.tensor(float(scores.numel())),
               "logprob_mismatch_max": torch.tensor([0.5, 7.0][rank]), "kl": torch.tensor([1.0, 3.0][rank]),
               "dropped_rows": torch.tensor([2.0, 1.0][rank])}
    row = reduce_metrics(metrics, torch.device("cpu"))
    with open(f"{out}.{rank}", "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_reduce_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_reduce_worker, args=(init, str(tmp_path / "row")), nprocs=2, join=True)
    rows = [json.loads((tmp_path / f"row.{r}").read_text()) for r in (0, 1)]
    pooled = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    assert rows[0] == rows[1]
    row = rows[0]
    assert row["logprob_mismatch_max"] == 7.0  # max, not the mean 3.75
    assert row["rm_score"] == pytest.approx(float(pooled.mean()))
    assert row["rm_score_std"] == pytest.approx(float(pooled.std()))  # pooled, not a mean of per-rank stds
    assert row["kl"] == 2.0 and row["dropped_rows"] == 3.0
    assert "rm_score_sq" not in row and "rm_score_n" not in row


# ------------------------------------------------------------------------------ 7. RM normalization
def test_ppo_applies_the_reward_models_saved_mean_std_and_scales_its_critic(tmp_path, tok):
    from fastrlhf.models import RewardModel, ValueModel, tiny_llama

    rm = RewardModel(tiny_llama(len(tok), seed=1), reward_mean=2.0, reward_std=4.0)
    rm.save_pretrained(tmp_path / "rm")
    critic = ValueModel.from_pretrained(tmp_path / "rm")
    trainer = PPO_tests().make_trainer(tmp_path / "out", tok, reward_model=rm)
    # the critic of make_trainer is fresh; build one from the RM to check the head
    from fastrlhf.trainers.ppo import init_critic_head

    assert init_critic_head(critic, rm)
    torch.testing.assert_close(critic.head.weight, rm.head.weight / 4.0)
    batch, scores = PPO_tests().scored_batch(trainer)
    raw = rm(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(scores, (raw - 2.0) / 4.0)
    # the critic's value at the last response token is the normalized score up to the mean shift 2 / 4
    last = (batch.attention_mask * torch.arange(batch.attention_mask.shape[1])).argmax(-1)  # left-padded prompts
    values = critic(batch.input_ids, batch.attention_mask)[torch.arange(4), last]
    torch.testing.assert_close(values, scores + 0.5, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ 7. log-ratio clamp
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_log_ratio_is_clamped_before_exp(backend, monkeypatch):
    from fastrlhf.kernels import fused_ppo_loss_from_logits
    from fastrlhf.kernels._triton_utils import interpreter_unavailable_reason

    if backend == "triton":
        if interpreter_unavailable_reason():
            pytest.skip(interpreter_unavailable_reason())
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 37, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (2, 3), generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    lp = torch.log_softmax(logits.detach(), -1).gather(-1, labels[..., None])[..., 0]
    old = lp.clone()
    old[0, 1] = lp[0, 1] - 100.0  # one token at log-ratio 100: exp overflows fp32 without the clamp
    adv = -torch.ones(2, 3)  # negative advantage: the unclipped (infinite) branch is the one chosen
    loss, stats = fused_ppo_loss_from_logits(logits, labels, old, adv, mask, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1].abs().max() == 0  # no gradient through a clamped log-ratio
    assert logits.grad[1].abs().max() > 0  # the other tokens train
    assert float(loss.detach()) == pytest.approx((5 * 1.0 + math.exp(20.0)) / 6, rel=1e-5)
    off, _ = fused_ppo_loss_from_logits(logits.detach(), labels, old, adv, mask, backend=backend,
                                       log_ratio_clip=None)
    assert not torch.isfinite(off)  # the clamp is what keeps it finite


# ------------------------------------------------------------------------------ 7. KL early stop first
def test_kl_early_stop_is_checked_before_the_update(tmp_path, tok):
    from fastrlhf.trainers.ppo import EarlyStopConfig

    trainer = _ppo(tmp_path, tok, iterations=6, kl=KLConfig(target=1e-4),
                   early_stop=EarlyStopConfig(kl_factor=2.0, score_falling_iters=None))
    rows = trainer.train()
    assert len(rows) == 2 and trainer.stop_state["stopped"].startswith("kl")  # iteration 1: KL 0
    assert "pg_loss" in rows[0] and "pg_loss" not in rows[1]  # the stopping iteration trained nothing
    one, two = (_dcp_tensors(tmp_path / "checkpoints" / f"step-0000000{i}", tmp_path / f"step{i}.pt")
                for i in (1, 2))
    actor = [k for k in one if k.startswith("model.actor.lm.")]
    assert actor and all(torch.equal(one[k], two[k]) for k in actor)  # the saved policy is the measured one


def _dcp_tensors(checkpoint: Path, out: Path) -> dict:
    """A DCP checkpoint folder's tensors as one flat {key: tensor} dict (read without unpickling objects)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(out))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix[:-1]] = obj
    walk("", torch.load(out, weights_only=True))
    return flat


# ------------------------------------------------------------------------------ 7. single BOS
def test_chat_template_with_a_bos_adding_tokenizer_gives_one_bos():
    from tokenizers import processors

    from fastrlhf.data import prompt_features
    from fastrlhf.data.tokenizer import DEFAULT_CHAT_TEMPLATE, TEST_WORDS, build_word_tokenizer
    from fastrlhf.trainers.reward import pair_features
    from fastrlhf.trainers.sft import sft_row_features

    tok = build_word_tokenizer(TEST_WORDS, chat_template="{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(  # like Llama: BOS on encode
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    bos = tok.bos_token_id
    sft = sft_row_features({"prompt": "hello cat", "response": "big dog"}, tok, 64, chat_template=True)
    rm = pair_features({"prompt": "hello", "chosen": "cat", "rejected": "dog"}, tok, 64, chat_template=True)
    ppo = prompt_features(common.format_prompt(tok, "hello cat", chat_template=True), tok)
    for ids in (sft["input_ids"], rm["chosen_input_ids"], rm["rejected_input_ids"], ppo["input_ids"]):
        assert ids[0] == bos and ids.count(bos) == 1, ids
    plain = sft_row_features({"prompt": "hello cat", "response": "big dog"}, tok, 64)  # no template: BOS kept
    assert plain["input_ids"][0] == bos and plain["input_ids"].count(bos) == 1


# ------------------------------------------------------------------------------ 4. over-long rows
def test_overlong_reward_pairs_are_dropped_never_cut(tmp_path, tok, capsys):
    from fastrlhf.data import DataError
    from fastrlhf.models import tiny_llama
    from fastrlhf.trainers.reward import RewardConfig, RewardTrainer

    rows = [{"prompt": "hello", "chosen": "cat dog", "rejected": "dog cat"}] * 3
    long = {"prompt": "hello", "chosen": "cat " * 30 + "good", "rejected": "cat " * 30 + "bad"}  # differ at the end
    cfg = dict(model="m", data="d", output_dir=str(tmp_path / "out"), max_length=16, max_steps=1, batch_size=2,
               micro_batch_size=2, progress=False, tensorboard=False)
    trainer = RewardTrainer(RewardConfig(**cfg), model=tiny_llama(len(tok)), tokenizer=tok,
                            train_rows=rows + [long])
    assert trainer.num_rows == 3
    out = capsys.readouterr().out
    assert "dropped 1 of 4 rows longer than the length limit (first: row index 3:" in out
    with pytest.raises(DataError, match=r"<train_rows>, row index 3: .*max_length=16 .*drop_overlong"):
        RewardTrainer(RewardConfig(**cfg, drop_overlong=False), model=tiny_llama(len(tok)), tokenizer=tok,
                      train_rows=rows + [long])


# ------------------------------------------------------------------------------ 7. report
def test_report_leaves_constant_series_out(tmp_path):
    from fastrlhf.telemetry.metrics import MetricsLogger
    from fastrlhf.telemetry.report import varying_keys, write_report

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"kl": 0.1 * step, "plan/actor.params": 5.0, "kl_coef": 0.1}, stage="ppo")
    log.log(3, {"mem/once": 7.0}, stage="ppo")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert varying_keys(rows, ["kl", "plan/actor.params", "kl_coef", "mem/once"]) == ["kl"]
    assert [p.name for p in write_report(tmp_path)] == ["ppo_train.png"]


def test_wandb_asked_for_but_not_installed_is_one_line(tmp_path, capsys):
    import importlib.util

    from fastrlhf.telemetry.metrics import MetricsLogger

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: this checks the message of a machine without it")
    log = MetricsLogger(tmp_path, tensorboard=False, wandb=True)
    log.log(1, {"kl": 0.5}, stage="ppo")
    log.close()
    assert capsys.readouterr().out.count("wandb=true but wandb is not installed") == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["kl"] == 0.5

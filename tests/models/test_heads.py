"""RewardModel, ValueModel, MultiHeadRewardModel, RewardEnsemble on tiny Llama / GPT-2 built from configs."""
from __future__ import annotations

import json

import pytest
import torch

from fastrlhf.models import (
    MultiHeadRewardModel,
    RewardEnsemble,
    RewardModel,
    ValueModel,
    last_token_index,
    load_head_model,
    position_ids_from_mask,
    tiny_gpt2,
    tiny_llama,
)

V = 61
ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
LENGTHS = [7, 3, 11, 1, 5]


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, V, (n,), generator=g) for n in LENGTHS]


def _pad(rows, side, extra=2, pad_id=V - 1):
    """Pad to max length + ``extra`` with an arbitrary (non-zero) pad id: outputs must not look at it."""
    t = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), t), pad_id)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def _valid(x, mask):
    """The valid entries of each row of ``x [B, T]`` as a list (row order preserved)."""
    return [x[i][mask[i].bool()] for i in range(x.shape[0])]


def test_position_ids_and_last_index():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask)[0, 2:].tolist() == [0, 1, 2]
    assert position_ids_from_mask(mask)[1, :2].tolist() == [0, 1]
    assert last_token_index(mask).tolist() == [4, 1, 0, 4]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_padding_invariance(arch, side):
    rm = RewardModel(ARCHS[arch](V, seed=1))
    rows = _rows()
    alone = torch.stack([rm(r[None], torch.ones(1, len(r), dtype=torch.long))[0] for r in rows])
    ids, mask = _pad(rows, side)
    scores = rm(ids, mask)
    assert scores.dtype == torch.float32 and scores.shape == (len(rows),)
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_value_padding_invariance(arch, side):
    vm = ValueModel(ARCHS[arch](V, seed=2), head_init_std=0.5)
    rows = _rows(1)
    alone = [vm(r[None], torch.ones(1, len(r), dtype=torch.long))[0] for r in rows]
    ids, mask = _pad(rows, side)
    values = vm(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert (values[mask == 0] == 0).all()
    for got, want in zip(_valid(values, mask), alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_value_head_starts_at_zero_and_reward_row_without_tokens():
    vm = ValueModel(tiny_llama(V))
    ids, mask = _pad(_rows(), "left")
    assert (vm(ids, mask) == 0).all()
    rm = RewardModel(tiny_llama(V))
    mask[2] = 0
    scores = rm(ids, mask)
    assert torch.isfinite(scores).all() and scores[2] == 0


def test_bf16_body_gives_fp32_scores_and_grads_reach_body():
    rm = RewardModel(tiny_llama(V).to(torch.bfloat16))
    assert rm.head.weight.dtype == torch.float32
    ids, mask = _pad(_rows(), "left")
    s = rm(ids, mask)
    assert s.dtype == torch.float32
    (s * torch.linspace(-1, 2, len(s))).sum().backward()
    assert rm.head.weight.grad.abs().sum() > 0
    assert rm.body.embed_tokens.weight.grad.float().abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_model_round_trip(arch, tmp_path):
    rm = RewardModel(ARCHS[arch](V, seed=3), reward_mean=0.25, reward_std=2.0)
    ids, mask = _pad(_rows(), "left")
    rm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    back = RewardModel.from_pretrained(tmp_path)
    torch.testing.assert_close(back(ids, mask), rm(ids, mask), atol=0, rtol=0)
    assert (back.reward_mean, back.reward_std) == (0.25, 2.0)
    torch.testing.assert_close(back.normalize(torch.tensor([2.25])), torch.tensor([1.0]))
    assert type(load_head_model(tmp_path)) is RewardModel


def test_value_model_round_trip_and_init_from_reward_model(tmp_path):
    vm = ValueModel(tiny_gpt2(V), head_init_std=0.3)
    ids, mask = _pad(_rows(), "right")
    vm.save_pretrained(tmp_path / "v")
    torch.testing.assert_close(ValueModel.from_pretrained(tmp_path / "v")(ids, mask), vm(ids, mask),
                               atol=0, rtol=0)
    rm = RewardModel(tiny_llama(V))
    rm.save_pretrained(tmp_path / "r")
    critic = ValueModel.from_pretrained(tmp_path / "r")
    # The critic's value at a row's last token is the reward model's score.
    idx = last_token_index(mask)
    at_last = critic(ids, mask)[torch.arange(len(idx)), idx]
    torch.testing.assert_close(at_last, rm(ids, mask), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="ValueModel"):
        RewardModel.from_pretrained(tmp_path / "v")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a fastrlhf head-model checkpoint"):
        RewardModel.from_pretrained(tmp_path)
    rm = RewardModel(tiny_llama(V))
    rm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "fastrlhf_head.json").read_text())
    meta["class"] = "Nope"
    (tmp_path / "fastrlhf_head.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Nope"):
        load_head_model(tmp_path)


def test_multihead_combination_and_round_trip(tmp_path):
    mh = MultiHeadRewardModel(tiny_llama(V), ["helpful", "harmless", "honest"],
                              {"helpful": 0.5, "harmless": 2.0})
    ids, mask = _pad(_rows(), "left")
    per_head = mh.head_scores(ids, mask)
    assert per_head.shape == (len(LENGTHS), 3)
    torch.testing.assert_close(mh(ids, mask), 0.5 * per_head[:, 0] + 2.0 * per_head[:, 1])
    torch.testing.assert_close(mh(ids, mask, head="honest"), per_head[:, 2])
    mh.set_weights([1.0, 0.0, -1.0])
    torch.testing.assert_close(mh(ids, mask), per_head[:, 0] - per_head[:, 2])
    with pytest.raises(KeyError, match="unknown head"):
        mh(ids, mask, head="funny")
    with pytest.raises(ValueError, match="unknown head"):
        mh.set_weights({"funny": 1.0})
    mh.save_pretrained(tmp_path)
    back = load_head_model(tmp_path)
    assert isinstance(back, MultiHeadRewardModel) and back.heads == ["helpful", "harmless", "honest"]
    torch.testing.assert_close(back(ids, mask), mh(ids, mask), atol=0, rtol=0)


def test_multihead_padding_invariance():
    mh = MultiHeadRewardModel(tiny_gpt2(V), ["a", "b"])
    rows = _rows(2)
    alone = torch.cat([mh.head_scores(r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows])
    torch.testing.assert_close(mh.head_scores(*_pad(rows, "left")), alone, atol=1e-5, rtol=0)


def test_ensemble_reductions(tmp_path):
    members = [RewardModel(tiny_llama(V, seed=s)) for s in range(3)]
    ids, mask = _pad(_rows(), "left")
    each = torch.stack([m(ids, mask) for m in members]).double()
    mean, std = each.mean(0), each.std(0, correction=0)
    torch.testing.assert_close(RewardEnsemble(members)(ids, mask).double(), mean, atol=1e-6, rtol=0)
    got_min = RewardEnsemble(members, "min")(ids, mask).double()
    torch.testing.assert_close(got_min, each.amin(0), atol=1e-6, rtol=0)
    got = RewardEnsemble(members, "mean_minus_std", k=0.5)(ids, mask).double()
    torch.testing.assert_close(got, mean - 0.5 * std, atol=1e-6, rtol=0)
    # One member: no spread, the conservative score is the score.
    single = RewardEnsemble(members[:1], "mean_minus_std")
    torch.testing.assert_close(single(ids, mask), members[0](ids, mask))
    for i, m in enumerate(members):
        m.save_pretrained(tmp_path / str(i))
    loaded = RewardEnsemble.from_pretrained([tmp_path / str(i) for i in range(3)], reduce="min")
    torch.testing.assert_close(loaded(ids, mask).double(), each.amin(0), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reduce"):
        RewardEnsemble(members, "median")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_cuda_padding_invariance(arch):
    """bf16 on CUDA: left and right padding agree with unpadded rows to bf16 precision."""
    rm = RewardModel(ARCHS[arch](V, seed=1)).cuda().to(torch.bfloat16)
    rows = [r.cuda() for r in _rows()]
    ones = [torch.ones(1, len(r), dtype=torch.long, device="cuda") for r in rows]
    alone = torch.stack([rm(r[None], m)[0] for r, m in zip(rows, ones, strict=True)])
    for side in ("left", "right"):
        ids, mask = _pad(rows, side)
        scores = rm(ids.cuda(), mask.cuda())
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, alone, atol=3e-2, rtol=3e-2)


def _tiny_from_config(name: str):
    """Qwen2 / Mistral built from their configs (head dim 32, as tiny_llama), for body discovery."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=128, max_position_embeddings=128)
    torch.manual_seed(4)
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    return MistralForCausalLM(MistralConfig(**kw)).eval()


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_other_architectures_padding_invariance_and_round_trip(name, tmp_path):
    rm = RewardModel(_tiny_from_config(name))
    rows = _rows(3)
    alone = torch.stack([rm(r[None], torch.ones(1, len(r), dtype=torch.long))[0] for r in rows])
    for side in ("left", "right"):
        torch.testing.assert_close(rm(*_pad(rows, side)), alone, atol=1e-5, rtol=0)
    rm.save_pretrained(tmp_path)
    back = RewardModel.from_pretrained(tmp_path)
    torch.testing.assert_close(back(*_pad(rows, "left")), alone, atol=1e-5, rtol=0)

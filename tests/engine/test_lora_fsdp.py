"""LoRA under FSDP2 on 2 gloo ranks (torchrun): adapters injected before sharding, only they (and the heads)
train; SFT and the reward model give the one-process LoRA losses; PPO's reference is the sharded actor with
its adapters disabled, its merged export and weight sync are gathered from the shards, and a resumed run
continues exactly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

from fastrlhf.telemetry.metrics import read_metrics  # noqa: E402
from tests.engine.conftest import write_tiny_ppo_inputs  # noqa: E402

HERE = Path(__file__).parent
LORA_RANK = 4


def _single(script: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTRLHF_FSDP": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


def _losses(out: Path, stage: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")
            if "loss" in r and r.get("stage") == stage]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_two_rank_lora_matches_one_process_through_a_crash_and_resume(stage, tmp_path, run_torchrun):
    """The same data, seed and global batch, LoRA: one process, and 2 ranks (FSDP2) where every rank raises at
    step 3, after the DCP checkpoint of step 2 (adapters, head and their AdamW state; no frozen base), then
    the same command resumes. The per-step losses equal the one-process ones (fp32), and the merged final/
    model (streamed from the shards) and its adapters equal the one-process ones."""
    from torch.distributed.checkpoint import FileSystemReader

    from fastrlhf.engine.distributed import free_port
    one, two = tmp_path / "one", tmp_path / "two"
    assert "fsdp=False world=0" in _single(HERE / "stage_worker.py", stage, str(one), str(LORA_RANK))
    crash = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", str(HERE / "stage_worker.py"), stage, str(two),
                            str(LORA_RANK), "3"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=300)
    assert crash.returncode != 0 and "simulated crash at step 3" in crash.stderr, crash.stderr[-3000:]
    assert "fsdp=True world=2" in crash.stdout
    ckpt = two / "checkpoints" / "step-00000002"
    keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert any("lora_B" in k for k in keys) and not any("base_layer" in k for k in keys), keys[:8]
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    proc = run_torchrun(HERE / "stage_worker.py", stage, str(two), str(LORA_RANK))
    assert "resuming from" in proc.stdout
    a, b = _losses(one, stage), _losses(two, stage)
    assert [s for s, _ in a] == [1, 2, 3] == [s for s, _ in b]  # the crashed run's rows, then the resumed one
    rel = max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a, b, strict=True))
    print(f"{stage} LoRA: one process {a}, two ranks (crash at 3, resumed) {b}, max rel. difference {rel:.2e}")
    assert rel <= 1e-5, (a, b)
    assert a[0][1] != a[-1][1]  # it trained
    if stage == "sft":
        from transformers import AutoModelForCausalLM
        m1 = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
        m2 = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    else:
        from fastrlhf.models.heads import load_head_model
        m1, m2 = load_head_model(one / "final").state_dict(), load_head_model(two / "final").state_dict()
    assert m1.keys() == m2.keys() and not any("lora_" in k or "base_layer" in k for k in m2)  # merged
    assert max((m1[k] - m2[k]).abs().max().item() for k in m1) < 1e-5
    from safetensors.torch import load_file  # the adapters (and head) next to the merged export
    s1, s2 = (load_file(d / "final" / "adapter.safetensors") for d in (one, two))
    assert s1.keys() == s2.keys() and any("lora_B" in k for k in s2)
    assert max((s1[k] - s2[k]).abs().max().item() for k in s1) < 1e-5


# ------------------------------------------------------------------------------------------------ PPO
PROMPTS = ["hello cat", "the big red dog is here", "what", "i like the small green bird"]
ITERATIONS = 2


def _ppo_setup(root: Path) -> Path:
    import yaml

    write_tiny_ppo_inputs(root, PROMPTS)
    cfg = {"model": str(root / "sft"), "reward_model": str(root / "rm"), "data": str(root / "data.jsonl"),
           "output_dir": str(root / "whole"), "iterations": ITERATIONS, "rollout_batch_size": 2,
           "minibatch_size": 1, "ppo_epochs": 2, "checkpoint_every": 1, "keep_checkpoints": 2,
           "max_prompt_length": 32, "progress": False, "precision": "fp32", "tensorboard": False,
           "gradient_checkpointing": True,
           "lora_rank": LORA_RANK, "actor_lr": 5e-3, "critic_lr": 5e-3, "kernel_backend": "torch",
           "rollout": {"max_new_tokens": 4}, "kl": {"target": 3.0}}
    (root / "ppo.yaml").write_text(yaml.safe_dump(cfg))
    return root / "ppo.yaml"


def _ppo_rows(out: Path) -> list[dict]:
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "ppo" and "kl" in r]
    return [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "time"
             and not k.startswith(("time/", "tokens_per_s/", "mem/", "plan/"))} for r in rows]


@pytest.mark.slow
def test_two_rank_lora_ppo_reference_merged_export_and_resume(tmp_path, run_torchrun):
    """``fastrlhf ppo`` with LoRA on 2 ranks: the worker's checks on the sharded trainer (reference = base
    model, merged sync and exports = one-process PEFT merge, adapters-only checkpoints); then the run resumed
    from its iteration-1 checkpoint (a copy of the folder without what iteration 2 wrote) logs the same
    iteration-2 metrics as the uninterrupted run."""
    import shutil
    config = _ppo_setup(tmp_path)
    proc = run_torchrun(HERE / "lora_ppo_worker.py", str(config))
    assert "LORA-FSDP-CHECKS-OK" in proc.stdout and "FSDP2 over 2 rank(s)" in proc.stdout, proc.stdout[-3000:]
    print("\n".join(line for line in proc.stdout.splitlines()
                    if "|ref - base|" in line or "merged sync" in line))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for name in (f"checkpoints/step-{ITERATIONS:08d}", "final", "critic", "plots"):
        shutil.rmtree(resumed / name, ignore_errors=True)
    (resumed / "ppo_result.json").unlink()
    proc = run_torchrun("fastrlhf", "ppo", "--config", str(config), f"output_dir={resumed}", module=True)
    assert "resumed from" in proc.stdout
    a, b = _ppo_rows(whole), _ppo_rows(resumed)
    assert [r["iteration"] for r in a] == [1, 2] == [r["iteration"] for r in b]
    assert a == b


@pytest.mark.slow
def test_two_rank_lora_ppo_bf16_stores_the_frozen_base_in_bf16(tmp_path, run_torchrun):
    """``precision=bf16``: the frozen base is stored in bf16 (as a frozen model: no fp32 master, the memory
    plan's assumption), adapters and heads keep fp32 masters; the same checks as above at bf16 tolerances."""
    config = _ppo_setup(tmp_path)
    proc = run_torchrun(HERE / "lora_ppo_worker.py", str(config), "precision=bf16")
    assert "LORA-FSDP-CHECKS-OK" in proc.stdout, proc.stdout[-3000:]
    print("\n".join(line for line in proc.stdout.splitlines()
                    if "|ref - base|" in line or "merged sync" in line))


@pytest.mark.slow
def test_two_rank_lora_ppo_vllm_samples_from_the_merged_sharded_actor(tmp_path, run_torchrun):
    """``rollout.backend=vllm`` on 2 ranks: every sync gathers the LoRA actor's FSDP2 units, merges
    ``W + (alpha/r) B A`` and loads it into each rank's vLLM engine; after an iteration of training (adapters
    no longer zero) vLLM's sampling log-probs equal the actor's. With a shared critic (the value head on the
    adapted actor, trained fully; not part of the synced policy)."""
    pytest.importorskip("vllm")
    config = _ppo_setup(tmp_path)
    run_torchrun("fastrlhf", "ppo", "--config", str(config), "rollout.backend=vllm", "checkpoint_every=2",
                 "shared_critic=true", module=True)
    assert not (tmp_path / "whole" / "critic").exists()
    rows = _ppo_rows(tmp_path / "whole")
    assert [r["iteration"] for r in rows] == [1, 2]
    print("logprob_mismatch_max per iteration:", [r["logprob_mismatch_max"] for r in rows])
    assert max(r["logprob_mismatch_max"] for r in rows) < 1e-4
    assert rows[-1]["kl"] != 0.0  # the second rollout came from trained adapters

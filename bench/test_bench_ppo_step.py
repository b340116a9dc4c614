"""Bench: one PPO iteration with the PPO trainer, and its SCORE + TRAIN math, fused vs eager.

``ppo_step``: ``PPOTrainer.iteration`` (HF rollout, actor / critic / reference / reward model built from
configs with random weights, 1 PPO epoch) with ``kernel_backend`` auto (``fastrlhf``) or ``torch``. Per-phase
times (generate, score, train, sync) and, on CUDA, per-phase peak memory come from the trainer's
``PhaseScheduler`` (median over rounds).

``ppo_score_train``: the score and update phases written out with the library's pieces, as DESIGN.md's
table has them, on random prompts/responses (no generation), to isolate what the kernels change:
  # 2. score: actor and reference forwards -> old / reference log-probs; token_rewards; gae; whiten
  # 4. update: actor forward with grad -> PPO loss from hidden states -> backward -> clip -> AdamW step
Reward-model scores and critic values are random tensors (their forwards cost the same for every
provider). ``fastrlhf`` takes the log-probs and the loss straight from hidden states
(``linear_token_logprobs``, ``fused_ppo_loss``, ``gae``); ``eager`` materializes the response logits
with the lm_head and uses ``bench/eager.py``. No floor (whole steps).
"""
from __future__ import annotations

import copy
import statistics

import pytest
import torch

from bench import eager
from bench.harness import Case, Timing, bench_profile, params, run_case
from fastrlhf.algo import token_rewards
from fastrlhf.engine.scheduler import PhaseScheduler
from fastrlhf.kernels import fused_ppo_loss, gae, linear_token_logprobs, masked_whiten

# P prompt tokens, T response tokens. GPU: Qwen2-0.5B / 1.5B-shaped models with random weights.
SHAPES = {
    "quick": [dict(model="tiny-llama", B=4, P=16, T=32, H=64, V=2048, L=2)],
    "gpu": [dict(model="qwen2-0.5b-shape", B=8, P=128, T=384, H=896, V=151936, L=24),
            dict(model="qwen2-1.5b-shape", B=8, P=128, T=384, H=1536, V=151936, L=28)],
}[bench_profile()]
LOSS = dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_low=0.2, clip_high=0.28,
            loss_agg="token-mean")
KL_PENALTY = 0.05


def build_model(shape: dict, device: torch.device):
    if shape["model"] == "tiny-llama":
        from fastrlhf.models.tiny import tiny_llama
        return tiny_llama(shape["V"], hidden_size=shape["H"], num_layers=shape["L"]).to(device)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    heads = shape["H"] // 64
    config = Qwen2Config(vocab_size=shape["V"], hidden_size=shape["H"], num_hidden_layers=shape["L"],
                         num_attention_heads=heads, num_key_value_heads=2,
                         intermediate_size=shape["H"] * 11 // 2,
                         tie_word_embeddings=True, max_position_embeddings=4096)
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(torch.bfloat16)


def response_hidden(model, input_ids, attention_mask, t: int) -> torch.Tensor:
    """Final hidden states at the positions that predict the last ``t`` tokens: ``[B, t, H]``."""
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[:, -t - 1:-1]


def make_step(shape: dict, provider: str, device: torch.device, sched: PhaseScheduler):
    actor = build_model(shape, device).train()
    ref = copy.deepcopy(actor).eval().requires_grad_(False)
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-6)
    head = lambda m: m.get_output_embeddings().weight  # noqa: E731

    def logprobs(model, hidden, labels):
        if provider == "fastrlhf":
            return linear_token_logprobs(hidden, head(model), labels)
        return eager.linear_token_logprobs(hidden, head(model), labels)

    def step(input_ids, attention_mask, mask, scores, values):
        labels = input_ids[:, -shape["T"]:]
        with sched.phase("generate"):  # responses are given: the scheduler's order starts here
            pass
        with sched.phase("score"), torch.no_grad():  # 2. score
            old = logprobs(actor, response_hidden(actor, input_ids, attention_mask, shape["T"]), labels)
            ref_lp = logprobs(ref, response_hidden(ref, input_ids, attention_mask, shape["T"]), labels)
            rewards, _ = token_rewards(scores, old, ref_lp, mask, kl_coef=KL_PENALTY)
            adv_fn = gae if provider == "fastrlhf" else eager.gae_loop  # 3. advantages
            advantages, _returns = adv_fn(rewards, values, mask, gamma=1.0, lam=0.95)
            advantages = masked_whiten(advantages, mask)
        with sched.phase("train"):  # 4. update
            hidden = response_hidden(actor, input_ids, attention_mask, shape["T"])
            if provider == "fastrlhf":
                loss = fused_ppo_loss(hidden, head(actor), labels, old, advantages, mask, ref_logprobs=ref_lp,
                                      **LOSS)[0]
            else:
                loss = eager.ppo_loss(hidden, head(actor), labels, old, advantages, mask, ref_logprobs=ref_lp,
                                      **LOSS)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def make_inputs(shape: dict, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    b, p, t, v = shape["B"], shape["P"], shape["T"], shape["V"]
    lengths = torch.randint(t // 2, t + 1, (b, 1), generator=gen, device=device)
    mask = torch.arange(t, device=device) < lengths  # right-padded responses
    return {"input_ids": torch.randint(0, v, (b, p + t), generator=gen, device=device),
            "attention_mask": torch.cat([torch.ones(b, p, dtype=torch.bool, device=device), mask],
                                        dim=1).long(),
            "mask": mask, "scores": torch.randn(b, generator=gen, device=device),
            "values": torch.randn(b, t, generator=gen, device=device)}


def median_phases(phases: list[dict]) -> dict:
    """Median over rounds of each phase's time (ms) and memory (MB); the first call warms up.

    On CUDA the scheduler resets the peak-memory counter at every phase, so the harness's own peak
    measurement sees only the last phase: ``peak_mem_mb`` becomes the largest phase peak instead
    (absolute: model weights and optimizer state included).
    """
    timed = phases[1:] or phases
    out = {}
    for key in timed[0]:
        if key.startswith("time/"):
            out[key[5:].replace("_s", "_ms")] = statistics.median(p[key] for p in timed) * 1e3
        elif key.startswith("mem/"):
            out[key[4:]] = statistics.median(p[key] for p in timed)
    peaks = [v for k, v in out.items() if k.endswith("_peak_mb")]
    if peaks:
        out.update(peak_mem_mb=max(peaks), peak_mem_kind="absolute, largest phase peak")
    return out


@pytest.mark.parametrize("shape, provider, mode", params(SHAPES, ("fastrlhf", "eager"), ("full",)))
def test_bench_ppo_score_train(benchmark, bench_session, shape, provider, mode):
    device = bench_session.device
    sched = PhaseScheduler(device)
    step = make_step(shape, provider, device, sched)
    phases: list[dict] = []

    def forward(**inputs):
        out = step(**inputs)
        phases.append({k: v for k, v in sched.pop_stats().items() if "generate" not in k})
        return out

    dims = {k: shape[k] for k in ("B", "T", "H", "V")}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    case = Case("ppo_score_train", provider, mode, dims, dtype, {})
    run_case(benchmark, bench_session, case, make_inputs=lambda: make_inputs(shape, device), forward=forward,
             extra={"model": shape["model"], "layers": shape["L"], "prompt_tokens": shape["P"]},
             late_extra=lambda: median_phases(phases))


# --------------------------------------------------------------------------- the trainer's whole iteration
# B prompts of P tokens, T new tokens each (sampled until T: random weights rarely stop early).
ITER_SHAPES = {
    "quick": [dict(model="tiny-llama", B=8, P=8, T=16, H=64, V=114, L=2)],
    "gpu": [dict(model="qwen2-0.5b-shape", B=16, P=64, T=128, H=896, V=151936, L=24)],
}[bench_profile()]
STEP_TIMING = Timing(warmup=0, min_rounds=3, max_rounds=5, budget_s=10.0)  # an iteration takes seconds on GPU
SPECIAL_IDS = 8  # build_test_tokenizer's special tokens are ids 0..7: prompts avoid them


def make_trainer(shape: dict, provider: str, device: torch.device, out_dir):
    from fastrlhf.data.tokenizer import build_test_tokenizer
    from fastrlhf.engine.runtime import init_runtime
    from fastrlhf.models import RewardModel, ValueModel
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer, RolloutConfig

    dtype = torch.float32 if shape["model"] == "tiny-llama" else torch.bfloat16
    actor = build_model(shape, device)
    reward_model = RewardModel(build_model(shape, device)).to(device, dtype)
    critic = ValueModel(build_model(shape, device)).to(device, dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(SPECIAL_IDS, shape["V"], (4 * shape["B"], shape["P"]), generator=gen).tolist()
    cfg = PPOConfig(output_dir=str(out_dir), iterations=10 ** 6, rollout_batch_size=shape["B"],
                    minibatch_size=shape["B"], ppo_epochs=1, max_prompt_length=shape["P"], entropy_coef=0.01,
                    checkpoint_every=10 ** 6, kernel_backend="auto" if provider == "fastrlhf" else "torch",
                    rollout=RolloutConfig(backend="hf", max_new_tokens=shape["T"]))
    return PPOTrainer(cfg, actor=actor, ref=copy.deepcopy(actor), reward_model=reward_model, critic=critic,
                      tokenizer=build_test_tokenizer(), prompts=prompts, runtime=init_runtime(str(device)),
                      output_dir=out_dir)


@pytest.mark.parametrize("shape, provider, mode", params(ITER_SHAPES, ("fastrlhf", "torch"), ("full",)))
def test_bench_ppo_step(benchmark, bench_session, shape, provider, mode, tmp_path):
    device = bench_session.device
    trainer = make_trainer(shape, provider, device, tmp_path)
    phases: list[dict] = []

    def forward():
        row = trainer.iteration(len(phases))
        phases.append({k: v for k, v in row.items() if k.startswith(("time/", "mem/"))})

    dims = {k: shape[k] for k in ("B", "T", "H", "V")}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    case = Case("ppo_step", provider, mode, dims, dtype, {})
    run_case(benchmark, bench_session, case, make_inputs=dict, forward=forward,
             extra={"model": shape["model"], "layers": shape["L"], "prompt_tokens": shape["P"],
                    "trainer": "PPOTrainer.iteration (hf rollout, actor+critic+ref+RM, 1 epoch)"},
             late_extra=lambda: median_phases(phases), timing=STEP_TIMING)

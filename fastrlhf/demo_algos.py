"""`fastrlhf demo --task arithmetic --algo ...` and the critic-free / offline algorithms of the demo.

Arithmetic task (``fastrlhf.data.arithmetic_task``): a tiny Llama trained from scratch by SFT on imperfect
worked answers (systematically wrong on the hard questions: a forgotten carry, an off-by-one subtraction),
then RL against the exact-answer reward (no reward model), or DPO on
pairs of its own samples labelled by that reward. Accuracy is measured on held-out questions (never seen in
SFT or RL) greedily (``rl.accuracy_before/after``) and by sampling at temperature 1 (what RL optimizes,
``rl.sampled_accuracy_before/after``), before and after.

The preference task's algorithms other than PPO (``--algo grpo|rloo|reinforce_pp|dpo``) reuse the demo's SFT
and reward model stages (``fastrlhf.demo``); only the PPOConfig changes (:func:`rl_config`), or DPO replaces
the RL stage (:func:`stage_dpo`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from fastrlhf.data import arithmetic_task as arith

ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp", "dpo")
TASKS = ("preference", "arithmetic")
# The critic-free estimators sample this many responses per prompt (and fewer prompts: same responses).
GROUP_N = 4


def rl_config(base, algo: str):
    """``base`` (the demo's PPOConfig) turned into algorithm ``algo`` with the same number of responses per
    iteration: critic-free ones sample ``GROUP_N`` per prompt for ``rollout_batch_size / GROUP_N`` prompts,
    add the KL to the loss (k3, as GRPO does) instead of the reward for grpo, and skip advantage whitening
    of their own."""
    if algo == "ppo":
        return base
    if algo not in ("grpo", "rloo", "reinforce_pp"):
        raise ValueError(f"--algo {algo} is not an RL algorithm of the demo")
    n = GROUP_N
    rollout = dataclasses.replace(base.rollout, n=n)
    kl = base.kl
    if algo == "grpo":  # GRPO: KL in the loss, not in the reward
        kl = dataclasses.replace(kl, loss_coef=0.04, loss_kind="k3")
    return dataclasses.replace(base, advantage_estimator=algo, rollout=rollout, kl=kl,
                               rollout_batch_size=max(1, base.rollout_batch_size // n))


def stage_dir(out: Path, algo: str) -> Path:
    """Where algorithm ``algo`` of the preference task trains: ``out/ppo`` (today's layout) or ``out/<algo>``."""
    return Path(out) / algo


@dataclasses.dataclass
class OfflinePolicies:
    """What ``fastrlhf.demo.evaluate_policies`` reads from a trainer, for an offline (DPO) run."""

    actor: torch.nn.Module
    ref: torch.nn.Module
    reward_model: torch.nn.Module
    runtime: object
    config: object
    result: dict


def stage_dpo(out: Path, s, tok, runtime, seed: int, sft_dir: Path, rm_dir: Path, rollout: str):
    """DPO on the same labelled pairs the reward model was trained on (regenerated from the seed), with the
    SFT policy as reference; returns an :class:`OfflinePolicies` for the demo's evaluation."""
    from fastrlhf.demo import load_policy, make_pairs, ppo_config
    from fastrlhf.models import PolicyWithLoss, RewardModel
    from fastrlhf.trainers.dpo import DPOConfig, DPOTrainer

    out_dir = stage_dir(out, "dpo")
    result_path = out_dir / "dpo_result.json"
    if runtime.is_main and not result_path.is_file():
        train_pairs, _ = make_pairs(load_policy(sft_dir).eval(), tok, s, seed)
        rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train_pairs]
        cfg = DPOConfig(model="demo:sft-policy", data="demo:pairs", output_dir=str(out_dir), lr=3e-4, beta=0.1,
                        epochs=1, batch_size=64, micro_batch_size=64, max_length=32, seed=seed, bf16=False,
                        device=str(runtime.device), warmup_ratio=0.05, progress=False, tensorboard=False)
        DPOTrainer(cfg, model=load_policy(sft_dir), tokenizer=tok, train_rows=rows).train()
    runtime.barrier()
    result = json.loads(result_path.read_text())
    temperature = dict(temperature=1.0, backend="auto")
    cfg = ppo_config(s, seed, rollout, out_dir)
    return OfflinePolicies(
        actor=PolicyWithLoss(load_policy(out_dir / "final"), **temperature).to(runtime.device),
        ref=PolicyWithLoss(load_policy(sft_dir), **temperature).to(runtime.device),
        reward_model=RewardModel.from_pretrained(rm_dir).to(runtime.device).eval(), runtime=runtime,
        config=dataclasses.replace(cfg, iterations=0), result=result)


def annotate_summary(summary: dict, *, algo: str, task_name: str, trainer) -> dict:
    """The arena keys of ``summary.json``: ``algo``, ``task`` and ``rl`` (today's ``ppo`` section, which is
    kept as an alias), with what the algorithm was (estimator, responses per prompt, DPO's result)."""
    rl = dict(summary["ppo"])
    if isinstance(trainer, OfflinePolicies):
        rl.update(iterations=None, dpo={k: v for k, v in trainer.result.items() if isinstance(v, (int, float))})
    else:
        cfg = trainer.config
        rl.update(advantage_estimator=cfg.advantage_estimator, policy_loss=cfg.policy_loss,
                  responses_per_prompt=cfg.rollout.n, prompts_per_iteration=cfg.rollout_batch_size)
    return {"algo": algo, "task": task_name, "rl": rl, **summary, "ppo": rl}


# ------------------------------------------------------------------------------------------ arithmetic
@dataclasses.dataclass(frozen=True)
class ArithSettings:
    n_demos: int = 3000
    sft_epochs: int = 4
    sft_lr: float = 3e-3
    iterations: int = 40
    prompts_per_iter: int = 16
    n: int = 8
    actor_lr: float = 2e-4
    n_eval: int = 512
    max_new_tokens: int = 7
    dpo_pairs: int = 1024
    kl_coef: float = 0.1
    dpo_lr: float = 3e-5
    dpo_beta: float = 0.1
    dpo_epochs: int = 3


# measured (seed 0, 2-core CPU): see README "Algorithms". SFT 16 epochs: the easy held-out questions right
# ~80% greedily, the hard ones answered with the demonstrators' habit; 80 RL iterations drop the habit.
ARITH_QUICK = ArithSettings(n_demos=4000, sft_epochs=16, iterations=80, actor_lr=2e-4, kl_coef=0.1, n_eval=256,
                            dpo_pairs=1024, dpo_lr=1.5e-4)
ARITH_FULL = ArithSettings(n_demos=4000, sft_epochs=16, iterations=120, actor_lr=1e-4, kl_coef=0.1, n_eval=512)


def _tiny_policy(tok, seed: int):
    from fastrlhf.models import tiny_llama

    return tiny_llama(len(tok), hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=seed,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


def arith_sft(out: Path, s: ArithSettings, tok, runtime, seed: int) -> Path:
    from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

    if runtime.is_main and not (out / "arith_sft" / "sft_result.json").is_file():
        rows = [{"prompt": r["prompt"], "response": r["response"]} for r in arith.make_demonstrations(s.n_demos, seed)]
        cfg = SFTConfig(model="demo:tiny_llama", data="demo:arithmetic", output_dir=str(out / "arith_sft"), lr=s.sft_lr,
                        epochs=s.sft_epochs, batch_size=64, micro_batch_size=64, max_length=16, seed=seed,
                        bf16=False, device=str(runtime.device), lr_scheduler="cosine", warmup_ratio=0.05,
                        progress=False, tensorboard=False)
        SFTTrainer(cfg, model=_tiny_policy(tok, seed), tokenizer=tok, train_rows=rows).train()
    runtime.barrier()
    return out / "arith_sft" / "final"


def arith_rl_config(s: ArithSettings, algo: str, seed: int, rollout: str, output_dir: Path):
    from fastrlhf.trainers.ppo import EarlyStopConfig, KLConfig, PPOConfig, RolloutConfig

    critic_free = algo != "ppo"
    n = s.n if critic_free else 1
    return PPOConfig(
        output_dir=str(output_dir), seed=seed, iterations=s.iterations,
        rollout_batch_size=s.prompts_per_iter * (1 if critic_free else s.n), minibatch_size=s.prompts_per_iter * s.n // 2,
        ppo_epochs=2, actor_lr=s.actor_lr, critic_lr=1e-3, reward_norm="none", reward_clip=None,
        advantage_estimator=algo if critic_free else "gae", checkpoint_every=10, progress=False,
        loss_agg="seq-mean-token-mean" if critic_free else "token-mean",
        rollout=RolloutConfig(backend=rollout, max_new_tokens=s.max_new_tokens, temperature=1.0, n=n),
        kl=KLConfig(controller="fixed", init_coef=0.0 if algo == "grpo" else s.kl_coef,
                    loss_coef=s.kl_coef if algo == "grpo" else 0.0, loss_kind="k3"),
        early_stop=EarlyStopConfig(kl_factor=None, length_factor=None, score_falling_iters=None),
    )


@torch.no_grad()
def arith_accuracy(policy, tok, prompts: list[str], *, seed: int, max_new_tokens: int) -> dict:
    """Accuracy on ``prompts`` sampling at temperature 1 and greedily."""
    from fastrlhf.demo import sample
    from fastrlhf.rollout.base import SamplingParams
    from fastrlhf.rollout.hf import HFRollout
    from fastrlhf.trainers.ppo import derive_seed

    policy.eval()
    texts, _ = sample(policy, tok, prompts, seed=derive_seed(seed, "arith-eval"), max_new_tokens=max_new_tokens)
    engine = HFRollout(policy, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    greedy = engine.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0))
    greedy_texts = [tok.decode(t, skip_special_tokens=True) for t in greedy.token_ids]
    hard = [arith.is_hard(*arith.parse_question(p)) for p in prompts]
    out = {"sampled": arith.accuracy(prompts, texts), "greedy": arith.accuracy(prompts, greedy_texts)}
    for name, keep in (("hard", True), ("easy", False)):
        sel = [i for i, h in enumerate(hard) if h == keep]
        out[f"greedy_{name}"] = arith.accuracy([prompts[i] for i in sel], [greedy_texts[i] for i in sel])
    # hard questions answered greedily with the demonstrators' habit (the systematic mistake)
    sel = [i for i, h in enumerate(hard) if h]
    out["greedy_habit_hard"] = sum(arith.final_number(greedy_texts[i]) == arith.habit(*arith.parse_question(prompts[i]))
                                   for i in sel) / max(len(sel), 1)
    return out


def arith_rl(out: Path, s: ArithSettings, tok, runtime, seed: int, sft_dir: Path, algo: str, rollout: str):
    from fastrlhf.algo import RewardFunctions
    from fastrlhf.demo import load_policy
    from fastrlhf.models import ValueModel
    from fastrlhf.trainers.ppo import PPOTrainer

    cfg = arith_rl_config(s, algo, seed, rollout, out / f"arith_{algo}")
    rows = arith.make_prompt_rows(2048, seed + 3, "train")
    critic = None
    if algo == "ppo":  # the critic starts from the SFT body (there is no reward model to start from)
        critic = ValueModel(load_policy(sft_dir))
    trainer = PPOTrainer(
        cfg, actor=load_policy(sft_dir), ref=load_policy(sft_dir), reward_model=None, critic=critic,
        tokenizer=tok, prompts=[r["prompt"] for r in rows], runtime=runtime,
        reward_fns=RewardFunctions([("exact_answer", arith.exact_answer_reward, 1.0)]),
        prompt_fields=[{"answer": r["answer"]} for r in rows], gold_fn=arith.exact_answer_gold,
    )
    trainer.train()
    trainer.save_final(out / f"arith_{algo}" / "final")
    return trainer


def arith_dpo(out: Path, s: ArithSettings, tok, runtime, seed: int, sft_dir: Path):
    """DPO on pairs of SFT samples labelled by the exact-answer reward (a right answer chosen over a wrong one)."""
    from fastrlhf.demo import load_policy, sample
    from fastrlhf.trainers.dpo import DPOConfig, DPOTrainer
    from fastrlhf.trainers.ppo import derive_seed

    prompts = [r["prompt"] for r in arith.make_prompt_rows(s.dpo_pairs * 2, seed + 5, "train")]
    sft = load_policy(sft_dir).eval()
    a, _ = sample(sft, tok, prompts, seed=derive_seed(seed, "dpo-a"), max_new_tokens=s.max_new_tokens)
    b, _ = sample(sft, tok, prompts, seed=derive_seed(seed, "dpo-b"), max_new_tokens=s.max_new_tokens)
    pairs = []
    for p, x, y in zip(prompts, a, b, strict=True):
        cx, cy = arith.is_correct(p, x), arith.is_correct(p, y)
        if cx != cy and x.strip() and y.strip():
            pairs.append({"prompt": p, "chosen": x if cx else y, "rejected": y if cx else x})
    cfg = DPOConfig(model="demo:sft-policy", data="demo:pairs", output_dir=str(out / "arith_dpo"), lr=s.dpo_lr,
                    beta=s.dpo_beta, epochs=s.dpo_epochs, batch_size=32, micro_batch_size=32, max_length=16, seed=seed, bf16=False,
                    device=str(runtime.device), warmup_ratio=0.05, progress=False, tensorboard=False)
    result = DPOTrainer(cfg, model=load_policy(sft_dir), tokenizer=tok, train_rows=pairs).train()
    return load_policy(out / "arith_dpo" / "final"), {"pairs": len(pairs), **result}


ARITH_RUN_FILE = "arith_run.json"


def check_arith_run(out: Path, *, seed: int, quick: bool) -> None:
    """``out`` resumes only the arithmetic run it holds (``arith_run.json`` records ``--seed`` / ``--quick``;
    the SFT stage is shared by every ``--algo``); another run's flags are a ``ConfigError`` naming them."""
    from fastrlhf.config import ConfigError

    mine, path = {"seed": seed, "quick": quick}, out / ARITH_RUN_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        if diff:
            raise ConfigError(f"{out} holds an arithmetic demo run with "
                              + ", ".join(f"--{k} {saved.get(k)}" for k in diff) + "; use another --out")
    elif (out / "arith_sft").exists():
        raise ConfigError(f"{out} holds an arithmetic SFT stage but no {ARITH_RUN_FILE}; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine) + "\n")


def run_arithmetic(out: str | Path, *, algo: str = "grpo", quick: bool = False, seed: int = 0,
                   rollout: str = "hf") -> dict:
    """SFT -> ``algo`` on the arithmetic task; ``summary.json`` with ``rl.accuracy_before`` / ``_after``."""
    from fastrlhf.demo import _single_thread, _write_json, load_policy
    from fastrlhf.engine import runtime as rt

    start, out = time.time(), Path(out)
    s = ARITH_QUICK if quick else ARITH_FULL
    check_arith_run(out, seed=seed, quick=quick)
    runtime = rt.init_runtime()
    heldout = [r["prompt"] for r in arith.make_prompt_rows(s.n_eval, seed + 4, "heldout")]
    with _single_thread():
        tok = arith.build_tokenizer()
        sft_dir = arith_sft(out, s, tok, runtime, seed)
        before = arith_accuracy(load_policy(sft_dir), tok, heldout, seed=seed, max_new_tokens=s.max_new_tokens)
        extra: dict = {}
        if algo == "dpo":
            policy, extra = arith_dpo(out, s, tok, runtime, seed, sft_dir)
        else:
            trainer = arith_rl(out, s, tok, runtime, seed, sft_dir, algo, rollout)
            policy = trainer.actor.lm
            hist = [r for r in trainer.history if "rm_score" in r]
            extra = {"iterations": trainer.config.iterations, "responses_per_prompt": trainer.config.rollout.n,
                     "train_reward_first": hist[0]["rm_score"] if hist else None,
                     "train_reward_last": hist[-1]["rm_score"] if hist else None}
        after = arith_accuracy(policy, tok, heldout, seed=seed, max_new_tokens=s.max_new_tokens)
    rl = {"accuracy_before": before["greedy"], "accuracy_after": after["greedy"],
          "sampled_accuracy_before": before["sampled"], "sampled_accuracy_after": after["sampled"],
          **{f"{k}_before": before[k] for k in ("greedy_hard", "greedy_easy", "greedy_habit_hard")},
          **{f"{k}_after": after[k] for k in ("greedy_hard", "greedy_easy", "greedy_habit_hard")},
          "heldout_questions": len({p for p in heldout}), "eval_prompts": len(heldout),
          "heldout_hard_prompts": sum(arith.is_hard(*arith.parse_question(p)) for p in heldout),
          "accuracy_definition": "share of held-out prompts (questions never in SFT or RL data) answered exactly "
                                 "by the greedy answer; sampled_accuracy_*: sampling at temperature 1; "
                                 "greedy_hard/easy_*: greedy accuracy on the hard (carry, subtraction of 5 or "
                                 "more) / other held-out prompts; greedy_habit_hard_*: share of hard ones answered "
                                 "with the demonstrators' systematic mistake", **extra}
    summary = {"task": "arithmetic", "algo": algo, "rl": rl, "world_size": runtime.world_size, "rollout": rollout,
               "quick": quick, "seed": seed, "seconds": time.time() - start}
    if runtime.is_main:
        _write_json(out / "summary.json", summary)
        print(f"\n==== fastrlhf demo (arithmetic, {algo}) ====\nheld-out accuracy (greedy): "
              f"{before['greedy']:.3f} -> {after['greedy']:.3f} (hard questions {before['greedy_hard']:.3f} -> "
              f"{after['greedy_hard']:.3f}); sampled at T=1: {before['sampled']:.3f} -> {after['sampled']:.3f}; "
              f"{summary['seconds']:.0f} s\n", flush=True)
    runtime.barrier()
    return summary


def load_summary(out: str | Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())

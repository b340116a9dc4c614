"""``fastrlhf ppo --config FILE.yaml [key=value ...]``: PPO on HF models and datasets.

Config keys (``PPOConfig``): ``model`` (the SFT policy: hub name or local dir; actor and reference
are loaded from it), ``reward_model`` (a ``RewardModel.save_pretrained`` dir), ``critic_model``
(default: the reward model), ``data`` (rows ``{"prompt"}``: jsonl / json / parquet / HF dataset),
``eval_data`` (held-out prompts for ``eval_every``), ``output_dir``, and every PPO setting.

Before any model is loaded: the config (keys, ranges, model folders), ``output_dir/ppo_config.json``
(a run resumes only under the config it started with), every data row, and the prompt lengths
(over-long prompts dropped with a count, or an error naming file and line with ``drop_overlong:
false``). The run holds ``output_dir``'s lock. Re-running the same command resumes from the last
checkpoint. Written at the end: ``output_dir/final`` (the policy, HF format with the tokenizer),
``output_dir/critic`` (a ``ValueModel`` folder), ``ppo_result.json`` and ``plots/``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fastrlhf.config import ConfigError, load_config
from fastrlhf.rollout.budget import check_rollout_against_model


def encode_prompts(rows, tokenizer, cfg, source: str) -> tuple[list[list[int]], list[str]]:
    """Prompt ids as SFT / RM saw them (chat template, single BOS); over-long ones dropped with a count
    (the first one's file and line) or, with ``drop_overlong=False``, a ``DataError`` naming it.
    Returns the kept prompts' ids and texts."""
    from fastrlhf.data import DataError, prompt_features
    from fastrlhf.trainers import common

    locations = getattr(rows, "locations", None)
    prompts, texts, dropped, first = [], [], 0, None
    for i, r in enumerate(rows):
        ids = prompt_features(common.format_prompt(tokenizer, r["prompt"], chat_template=cfg.chat_template),
                              tokenizer)["input_ids"]
        if len(ids) > cfg.max_prompt_length:
            where = locations[i] if locations else f"row index {i}"
            why = f"the prompt has {len(ids)} tokens, more than max_prompt_length={cfg.max_prompt_length}"
            if not cfg.drop_overlong:
                raise DataError(source, where, f"{why} (drop_overlong: true drops such rows)")
            dropped += 1
            first = first or f"{where}: {why}"
            continue
        prompts.append(ids)
        texts.append(r["prompt"])
    common.report_dropped(source, dropped, len(rows), first)
    if not prompts:
        raise DataError(source, None, "no prompt fits max_prompt_length")
    return prompts, texts


def check_ppo_cli_config(cfg, config_path: str) -> None:
    """Everything about ``cfg`` that can be checked without loading a model."""
    from fastrlhf.algo import needs_critic
    from fastrlhf.models.heads import HEAD_FILE
    from fastrlhf.trainers import guard
    from fastrlhf.trainers.ppo import check_ppo_config

    for key in ("model", "data"):
        if not getattr(cfg, key):
            raise ConfigError(f"{config_path}: `{key}` is required for `fastrlhf ppo`")
    if not cfg.reward_model and not cfg.rewards:
        raise ConfigError(f"{config_path}: `reward_model` or `rewards` is required for `fastrlhf ppo`")
    critic_free = not needs_critic(cfg.advantage_estimator)
    if not (critic_free or cfg.shared_critic or cfg.critic_model or cfg.reward_model):
        raise ConfigError(f"{config_path}: advantage_estimator={cfg.advantage_estimator} needs a critic: set "
                          "critic_model (or reward_model), or shared_critic: true")
    guard.check_model_dir("model", cfg.model)
    guard.check_model_dir("reward_model", cfg.reward_model, needs=("config.json", HEAD_FILE))
    guard.check_model_dir("critic_model", cfg.critic_model, needs=("config.json", HEAD_FILE))
    if cfg.eval_every and not cfg.eval_data:
        raise ConfigError(f"{config_path}: eval_every={cfg.eval_every} needs eval_data (held-out prompts)")
    check_ppo_config(cfg, cfg.output_dir)
    check_rollout_against_model(cfg)  # positions and KV budget from config.json, before any model loads


def run_from_config(config_path: str, overrides: Sequence[str] = ()) -> int:
    from fastrlhf.data import read_rows
    from fastrlhf.algo import needs_critic
    from fastrlhf.engine import runtime as rt
    from fastrlhf.models import load_tokenizer
    from fastrlhf.trainers import guard
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer
    from fastrlhf.trainers.ppo_rewards import build_reward_functions, combine_reward_models, kept_rows

    cfg = load_config(PPOConfig, config_path, overrides)
    check_ppo_cli_config(cfg, config_path)
    rows = read_rows(cfg.data, kind="ppo")  # validates every row before any model is loaded
    eval_rows = read_rows(cfg.eval_data, kind="ppo") if cfg.eval_data else None
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    prompts, texts = encode_prompts(rows, tokenizer, cfg, cfg.data)
    kept = kept_rows(rows, texts)  # the rows of the prompts that fit: their fields reach reward functions
    eval_prompts, eval_texts = (encode_prompts(eval_rows, tokenizer, cfg, cfg.eval_data) if eval_rows
                                else (None, None))
    with guard.output_dir_lock(cfg.output_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        runtime = rt.init_runtime()
        guard.pin_threads(cfg.num_threads, runtime.device)
        reward_fns = build_reward_functions(cfg, source=config_path)  # before any model loads
        with_critic = not cfg.shared_critic and needs_critic(cfg.advantage_estimator)
        actor, critic, ref, main_rm = load_ppo_models(cfg, runtime, critic=with_critic)  # one after another
        reward_model = combine_reward_models(cfg, main_rm, dtype=cfg.dtype, source=config_path)
        trainer = PPOTrainer(cfg, actor=actor, ref=ref, reward_model=reward_model, critic=critic,
                             tokenizer=tokenizer, prompts=prompts, runtime=runtime,
                             eval_prompts=eval_prompts, eval_texts=eval_texts, reward_fns=reward_fns,
                             prompt_texts=texts, prompt_fields=[{k: v for k, v in r.items() if k != "prompt"}
                                                                for r in kept])
        trainer.train()
        result = trainer.finish()
    if runtime.is_main:
        print(f"[fastrlhf] ppo done: {Path(cfg.output_dir) / 'final'}  {result}", flush=True)
    return 0


def load_ppo_models(cfg, runtime, *, critic: bool = True):
    """Actor, critic (None unless ``critic``), reference and reward model (None without ``reward_model``: reward
    functions or ``rewards`` entries only), loaded one after another:
    rank 0 reads each checkpoint, the other ranks build on the meta device and receive their FSDP2
    shards (``fastrlhf.engine.loading``); frozen models arrive in the compute dtype."""
    from fastrlhf.engine.loading import causal_lm_source, head_model_source, materialize
    from fastrlhf.engine.precision import resolve_precision
    from fastrlhf.models import RewardModel, ValueModel
    from fastrlhf.models.policy import PolicyWithLoss
    from fastrlhf.trainers.common import lora_source

    precision = resolve_precision(cfg.precision, runtime.device)
    wrap = dict(temperature=cfg.rollout.temperature or 1.0, backend=cfg.kernel_backend)
    # LoRA in one process: plain modules (also on a GPU); under torchrun the adapters are injected before
    # FSDP2 shards actor and critic (common.lora_source)
    plain = False if cfg.lora_rank and runtime.world_size == 1 else None
    # the memory plan from the config.json files, before any weight is read (refused here if nothing fits);
    # offload=all (chosen, or set) puts the trained shards under FSDP2's CPUOffloadPolicy
    from fastrlhf.engine.memory import MemoryPlanError
    from fastrlhf.engine.planner import PlanError
    from fastrlhf.engine.runtime import plan_before_loading
    try:
        offload = plan_before_loading(runtime, cfg, fsdp=runtime.fsdp if plain is None else plain,
                                      critic=critic, ref=not cfg.lora_rank) == "all"
    except (MemoryPlanError, PlanError) as err:
        raise ConfigError(str(err)) from None
    actor = materialize(runtime, lora_source(cfg, causal_lm_source(
        cfg.model, wrap=lambda m: PolicyWithLoss(m, shared_critic=cfg.shared_critic, **wrap))),
        train=True, precision=precision, offload_params=offload, fsdp=plain)
    critic = None if not critic else materialize(
        runtime, lora_source(cfg, head_model_source(cfg.critic_model or cfg.reward_model, ValueModel)),
        train=True, precision=precision, offload_params=offload, fsdp=plain)
    # LoRA: no reference model (the actor with its adapters disabled computes the reference log-probs)
    ref = None if cfg.lora_rank else materialize(
        runtime, causal_lm_source(cfg.model, wrap=lambda m: PolicyWithLoss(m, **wrap)),
        train=False, precision=precision, fsdp=plain)
    reward = None if not cfg.reward_model else materialize(
        runtime, head_model_source(cfg.reward_model, RewardModel), train=False, precision=precision,
        fsdp=plain)
    return actor, critic, ref, reward

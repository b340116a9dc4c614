"""``fastrlhf ppo --config FILE.yaml [key=value ...]``: PPO on HF models and datasets.

Config keys (``PPOConfig``): ``model`` (the SFT policy: hub name or local dir; actor and reference
are loaded from it), ``reward_model`` (a ``RewardModel.save_pretrained`` dir), ``critic_model``
(default: the reward model), ``data`` (rows ``{"prompt"}``: jsonl / json / parquet / HF dataset),
``output_dir``, and every PPO setting. Re-running the same command resumes from the last checkpoint.
The final policy is written to ``output_dir/final`` (HF format, with the tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastrlhf.config import load_config


def run_from_config(config_path: str, overrides: Sequence[str] = ()) -> int:
    from fastrlhf.data import prompt_features, read_rows
    from fastrlhf.engine import runtime as rt
    from fastrlhf.models import ValueModel, load_causal_lm, load_tokenizer
    from fastrlhf.trainers import common
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    from fastrlhf.algo import needs_critic
    from fastrlhf.trainers.ppo_rewards import build_rewards

    cfg = load_config(PPOConfig, config_path, overrides)
    for key in ("model", "data"):
        if not getattr(cfg, key):
            raise ValueError(f"{config_path}: `{key}` is required for `fastrlhf ppo`")
    rows = read_rows(cfg.data, kind="ppo")  # validates every row before any model is loaded
    runtime = rt.init_runtime()
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    # formatted and tokenized as SFT / RM saw them; length-checked before any model is loaded
    prompts = []
    for i, r in enumerate(rows):
        ids = prompt_features(common.format_prompt(tokenizer, r["prompt"], chat_template=cfg.chat_template),
                              tokenizer)["input_ids"]
        if len(ids) > cfg.max_prompt_length:
            raise ValueError(f"{cfg.data}, row {i + 1}: the prompt has {len(ids)} tokens, more than "
                             f"max_prompt_length={cfg.max_prompt_length}")
        prompts.append(ids)
    reward_model, reward_fns = build_rewards(cfg, dtype=cfg.dtype, source=config_path)  # functions first
    actor = load_causal_lm(cfg.model, dtype=cfg.dtype)
    ref = load_causal_lm(cfg.model, dtype=cfg.dtype)
    critic_from = cfg.critic_model or cfg.reward_model
    if needs_critic(cfg.advantage_estimator) and not cfg.shared_critic and not critic_from:
        raise ValueError(f"{config_path}: advantage_estimator={cfg.advantage_estimator} needs a critic: set "
                         "critic_model (or reward_model), or shared_critic: true")
    critic = (
        None
        if cfg.shared_critic or not needs_critic(cfg.advantage_estimator)
        else ValueModel.from_pretrained(critic_from, dtype=cfg.dtype)
    )
    trainer = PPOTrainer(
        cfg,
        actor=actor,
        ref=ref,
        reward_model=reward_model,
        critic=critic,
        tokenizer=tokenizer,
        prompts=prompts,
        runtime=runtime,
        reward_fns=reward_fns,
        prompt_texts=[r["prompt"] for r in rows],  # what reward functions and gold_fn read: the row's text
        prompt_fields=[{k: v for k, v in r.items() if k != "prompt"} for r in rows],
    )
    trainer.train()
    trainer.save_final()
    return 0

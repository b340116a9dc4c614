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
    from fastrlhf.models import load_tokenizer
    from fastrlhf.trainers import common
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    cfg = load_config(PPOConfig, config_path, overrides)
    for key in ("model", "reward_model", "data"):
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
    actor, critic, ref, reward_model = load_ppo_models(cfg, runtime)
    trainer = PPOTrainer(
        cfg,
        actor=actor,
        ref=ref,
        reward_model=reward_model,
        critic=critic,
        tokenizer=tokenizer,
        prompts=prompts,
        runtime=runtime,
    )
    trainer.train()
    trainer.save_final()
    return 0


def load_ppo_models(cfg, runtime):
    """Actor, critic (None with ``shared_critic``), reference and reward model, loaded one after another:
    rank 0 reads each checkpoint, the other ranks build on the meta device and receive their FSDP2
    shards (``fastrlhf.engine.loading``); frozen models arrive in the compute dtype."""
    from fastrlhf.engine.loading import causal_lm_source, head_model_source, materialize
    from fastrlhf.engine.precision import resolve_precision
    from fastrlhf.models import RewardModel, ValueModel
    from fastrlhf.models.policy import PolicyWithLoss

    precision = resolve_precision(cfg.precision, runtime.device)
    wrap = dict(temperature=cfg.rollout.temperature or 1.0, backend=cfg.kernel_backend)
    offload = cfg.offload in ("params", "all")
    actor = materialize(runtime, causal_lm_source(
        cfg.model, wrap=lambda m: PolicyWithLoss(m, shared_critic=cfg.shared_critic, **wrap)),
        train=True, precision=precision, offload_params=offload)
    critic = None if cfg.shared_critic else materialize(
        runtime, head_model_source(cfg.critic_model or cfg.reward_model, ValueModel), train=True,
        precision=precision, offload_params=offload)
    ref = materialize(runtime, causal_lm_source(cfg.model, wrap=lambda m: PolicyWithLoss(m, **wrap)),
                      train=False, precision=precision)
    reward = materialize(runtime, head_model_source(cfg.reward_model, RewardModel), train=False,
                         precision=precision)
    return actor, critic, ref, reward

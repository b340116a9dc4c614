"""PPOConfig: every PPO default, once (frozen dataclasses; YAML / key=value only set fields).

Defaults follow the seed's recipe (Ziegler et al. 2019; Ouyang et al. 2022; the "N implementation
details of RLHF with PPO" notes): gamma 1, lambda 0.95, clip 0.2, value clip 0.2, 4 PPO epochs,
actor LR in 1e-6..5e-6 with the critic at a few times that, grad norm 1.0, an adaptive KL
coefficient aiming at a per-sequence KL of 6 nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastrlhf.config import ConfigError

KL_CONTROLLERS = ("adaptive", "step", "fixed")
REWARD_NORMS = ("none", "batch", "running", "length")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
ROLLOUT_CORRECTIONS = ("none", "tis")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling and the rollout engine (checked against the model by ``fastrlhf.rollout.budget``).

    ``n`` responses per prompt (rows of a prompt adjacent, ``PPOBatch.group`` its index). ``top_p`` /
    ``top_k`` truncate the sampling distribution in both backends, and both report the log-prob of the
    truncated distribution the token was drawn from. vLLM only: ``max_model_len`` (None:
    ``max_prompt_length + max_new_tokens``), ``tensor_parallel_size``, ``gpu_memory_utilization`` (the
    engine's share of the whole GPU: weights + KV cache), ``enforce_eager`` (None: eager on CPU, CUDA
    graphs on GPU), ``max_num_seqs`` (None: vLLM's default), ``sleep_level`` (0: never sleep; 1: weights
    to host during SCORE/TRAIN; 2: weights discarded, the SYNC refills them), ``dtype`` (auto: bf16 on
    CUDA, fp32 on CPU), ``bucket_mb`` (weight-sync bucket).
    """

    backend: str = "hf"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    bucket_mb: int = 256
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None
    max_num_seqs: int | None = None
    sleep_level: int = 2
    dtype: str = "auto"

    def __post_init__(self):
        from fastrlhf.rollout.budget import check_rollout_config

        check_rollout_config(self)


@dataclass(frozen=True)
class KLConfig:
    """KL to the reference policy.

    ``controller`` sets the reward penalty coefficient: "adaptive" (Ziegler's proportional rule,
    ``horizon``), "step" (x/÷ ``step_factor`` outside ``[target/tol, target*tol]``) or "fixed".
    ``target`` is in nats per sequence: the mean over responses of the summed per-token k1 estimate
    ``sum_t log pi(y_t) - log ref(y_t)``. ``kind`` is the per-token estimator in the reward penalty;
    ``loss_coef`` / ``loss_kind`` add a KL term to the policy loss (GRPO style, off by default).
    """

    controller: str = "adaptive"
    init_coef: float = 0.1
    target: float = 6.0
    horizon: int = 10000
    step_factor: float = 2.0
    step_tolerance: float = 1.5
    min_coef: float = 0.01
    max_coef: float = 0.5
    kind: str = "k1"
    loss_coef: float = 0.0
    loss_kind: str = "k3"


@dataclass(frozen=True)
class EarlyStopConfig:
    """Rules that end training early, each logged when it fires (None disables a rule).

    ``kl_factor``: KL > kl_factor * target. ``length_factor``: mean response length > length_factor x
    the SFT policy's (measured at the first iteration). ``score_falling_iters``: the EMA (``score_ema``)
    of the mean RM score fell for that many iterations in a row.
    """

    kl_factor: float | None = 2.0
    length_factor: float | None = 2.0
    score_falling_iters: int | None = 20
    score_ema: float = 0.9


@dataclass(frozen=True)
class RewardSpec:
    """One entry of ``rewards``: a Python function ``"module:name"`` (``fn(prompts, responses, **row) ->
    list[float]``) or reward model directories (one, or several combined as ``RewardEnsemble`` does by
    ``reduce``: ``mean`` | ``min`` | ``mean_minus_std`` with ``k``), with its ``weight`` in the sum."""

    function: str = ""
    reward_model: tuple[str, ...] = ()
    reduce: str = "mean"
    k: float = 1.0
    weight: float = 1.0


@dataclass(frozen=True)
class PPOConfig:
    # what to train (``fastrlhf ppo``; the demo builds models in memory and ignores these)
    model: str = ""
    reward_model: str = ""
    critic_model: str | None = None  # None: initialise the critic from the reward model
    data: str = ""
    output_dir: str = "runs/ppo"
    dtype: str | None = None  # deprecated alias of precision (bfloat16 / float32), removed in 0.3
    precision: str = "auto"  # auto | bf16 | fp32 (fastrlhf.engine.precision)
    gradient_checkpointing: bool = False  # actor and critic (kept in train mode with dropout 0)
    offload: str = "auto"  # auto | none | optimizer | params | all
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    max_prompt_length: int = 512
    drop_overlong: bool = True  # prompts over max_prompt_length: dropped with a count (False: an error)
    eval_data: str | None = None  # held-out prompts ({"prompt"} rows) for eval_every
    eval_every: int = 0  # iterations between evaluations on eval_data (0: none); also at the end
    eval_samples: int = 4  # sample generations per evaluation written to eval_samples.jsonl
    chat_template: bool = False  # prompts as one user turn of the chat template: keep equal to sft/rm
    seed: int = 0
    # schedule
    iterations: int = 100
    rollout_batch_size: int = 64  # prompts per rank per iteration
    minibatch_size: int = 32  # rows per optimizer step (per rank)
    micro_batch_size: int | None = None  # rows per forward/backward; None = whole minibatch
    ppo_epochs: int = 4
    # advantages and losses
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    log_ratio_clip: float | None = 20.0  # log pi - log pi_old clamped to +-this before exp (veRL); None: off
    value_clip: float | None = 0.2
    vf_coef: float = 0.5  # weight of the value loss when the value head sits on the actor
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    reward_norm: str = "running"
    reward_clip: float | None = 10.0
    # algorithm (fastrlhf.algo registries): critic-free estimators build no critic and no value loss
    advantage_estimator: str = "gae"  # gae | grpo | rloo | reinforce_pp | reinforce_pp_baseline
    grpo_norm_std: bool = True  # false: Dr. GRPO (no division by the group std)
    policy_loss: str = "ppo"  # ppo | gspo
    rewards: tuple[RewardSpec, ...] = ()  # added to the reward_model's score (weight 1), if any
    filter_groups: bool = False  # DAPO dynamic sampling: groups whose scores are all equal get no loss
    # optimisation
    actor_lr: float = 2e-6
    critic_lr: float = 1e-5
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    shared_critic: bool = False
    packing: bool = True  # score / train forwards on packed valid tokens (fastrlhf.models.packing)
    # rows with a non-finite reward score are dropped; the run stops when more than this share of the
    # rows of the last ``nonfinite_window`` iterations was lost
    max_nonfinite_share: float = 0.5
    nonfinite_window: int = 10
    # bookkeeping
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    kernel_backend: str = "auto"
    progress: bool = True  # a progress bar over iterations on rank 0
    tensorboard: bool = True  # output_dir/tensorboard (when tensorboard is installed), as sft / rm
    wandb: bool = False  # also log to Weights & Biases (when wandb is installed)
    num_threads: int = 1  # torch threads of a CPU run (0: torch's default); see README
    # off-policy and truncation corrections of the rollout (see fastrlhf.rollout.correction)
    rollout_correction: str = "none"  # none | tis: per-token loss x min(exp(old - sampler lp), tis_cap)
    tis_cap: float = 2.0
    missing_eos_penalty: float = 0.0  # subtracted from the RM score of responses cut at max_new_tokens
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def __post_init__(self):
        checks = [
            (self.kl.controller in KL_CONTROLLERS, f"kl.controller must be one of {KL_CONTROLLERS}"),
            (self.reward_norm in REWARD_NORMS, f"reward_norm must be one of {REWARD_NORMS}"),
            (self.loss_agg in LOSS_AGGS, f"loss_agg must be one of {LOSS_AGGS}"),
            (self.iterations >= 0, "iterations must be >= 0"),
            (self.rollout_batch_size >= 1, "rollout_batch_size must be >= 1"),
            (
                1 <= self.minibatch_size <= self.rollout_batch_size * self.rollout.n,
                "minibatch_size must be in [1, rollout_batch_size * rollout.n] (it counts responses)",
            ),
            (self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.kl.target > 0, "kl.target must be > 0"),
            (self.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1"),
            (self.rollout_correction in ROLLOUT_CORRECTIONS,
             f"rollout_correction must be one of {ROLLOUT_CORRECTIONS}, got {self.rollout_correction!r}"),
            (self.tis_cap > 0, f"tis_cap must be > 0, got {self.tis_cap}"),
            (self.missing_eos_penalty >= 0,
             f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}"),
            (0.0 <= self.max_nonfinite_share <= 1.0, "max_nonfinite_share must be in [0, 1]"),
            (self.nonfinite_window >= 1, "nonfinite_window must be >= 1"),
            (self.log_ratio_clip is None or self.log_ratio_clip > 0, "log_ratio_clip must be > 0 (or null)"),
        ]
        checks += [
            (self.dtype is None or self.dtype in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto"),
             f"dtype must be float32|bfloat16|float16|auto, got {self.dtype!r}"),
            (self.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
            (self.eval_every >= 0 and self.eval_samples >= 0, "eval_every and eval_samples must be >= 0"),
            (self.num_threads >= 0, "num_threads must be >= 0"),
            (self.kernel_backend in ("auto", "triton", "torch"), "kernel_backend must be auto|triton|torch"),
            (0.0 <= self.lam <= 1.0 and 0.0 <= self.gamma <= 1.0, "gamma and lam must be in [0, 1]"),
            (self.actor_lr > 0 and self.critic_lr > 0, "actor_lr and critic_lr must be > 0"),
            (self.keep_checkpoints >= 0, "keep_checkpoints must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"PPOConfig: {message}")
        from fastrlhf.rollout.budget import check_lengths
        from fastrlhf.trainers.common import validate_scale_keys

        check_lengths(self.max_prompt_length, self.rollout)  # max_model_len vs prompt + response
        validate_scale_keys(self)
        self._check_algorithm()

    def _check_algorithm(self):
        from fastrlhf.algo import adv_estimator_names, needs_critic, policy_loss_names

        if self.advantage_estimator not in adv_estimator_names():
            raise ConfigError(f"PPOConfig: advantage_estimator must be one of {adv_estimator_names()}, "
                              f"got {self.advantage_estimator!r}")
        if self.policy_loss not in policy_loss_names():
            raise ConfigError(f"PPOConfig: policy_loss must be one of {policy_loss_names()}, "
                              f"got {self.policy_loss!r}")
        if self.rollout.n < 1:
            raise ConfigError(f"PPOConfig: rollout.n must be >= 1, got {self.rollout.n}")
        grouped = self.advantage_estimator in ("grpo", "rloo", "reinforce_pp_baseline") or self.filter_groups
        if grouped and self.rollout.n < 2:
            what = ("filter_groups" if self.filter_groups
                    else f"advantage_estimator={self.advantage_estimator}")
            raise ConfigError(f"PPOConfig: {what} compares the responses of a prompt: set rollout.n >= 2")
        if not needs_critic(self.advantage_estimator) and self.shared_critic:
            raise ConfigError(f"PPOConfig: advantage_estimator={self.advantage_estimator} is critic-free; "
                              "shared_critic must be false")
        for i, r in enumerate(self.rewards):
            if bool(r.function) == bool(r.reward_model):
                raise ConfigError(f"PPOConfig: rewards[{i}] needs exactly one of 'function' or "
                                  "'reward_model'")
            if r.reduce not in ("mean", "min", "mean_minus_std"):
                raise ConfigError(f"PPOConfig: rewards[{i}].reduce must be mean, min or mean_minus_std, "
                                  f"got {r.reduce!r}")

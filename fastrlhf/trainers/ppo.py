"""PPO with actor, critic, frozen reference and frozen reward model (Ziegler et al. 2019; Ouyang et al. 2022).

One iteration, as in DESIGN.md ("One PPO iteration"):

    1. generate  responses for this rank's prompt shard through the rollout engine
    2. score     old log-probs (actor, training numerics), reference log-probs, RM scores, values;
                 normalize_rewards -> token_rewards (KL penalty at the controller's coefficient)
                 -> gae -> advantage whitening over valid tokens
    3. train     ppo_epochs x minibatches of fused_ppo_loss (+ clipped value loss), grad clipping,
                 optimizer steps; then the KL controller update and the early-stop rules
    4. sync      actor weights -> rollout engine (a no-op for the HF backend)

Device, process group, model wrapping, rollout engine and weight sync come only from
``fastrlhf.engine.runtime``, so the same code runs in one process and under torchrun with FSDP2 / vLLM.
Each rank samples its own prompt shard; metrics are reduced over ranks (``ppo_checks.reduce_metrics``:
means, ``*_max`` as max, the RM score's std from pooled moments); only rank 0 writes files.
A row with a non-finite score is dropped from its rollout; the early-stop rules judge a rollout before
its update; evaluation on held-out prompts and the end of a run live in ``ppo_eval``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastrlhf.algo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    StepKLController,
    compute_advantages,
    filter_groups,
    needs_critic,
    normalize_rewards,
    token_rewards,
)
from fastrlhf.config import RunError
from fastrlhf.data import prompt_features
from fastrlhf.engine import runtime as rt
from fastrlhf.kernels import masked_mean, masked_var, masked_whiten, ppo_value_loss
from fastrlhf.models.policy import PolicyWithLoss
from fastrlhf.rollout.base import SamplingParams
from fastrlhf.rollout.budget import check_rollout_against_model, config_dict
from fastrlhf.rollout.correction import apply_tis, missing_eos_penalty, tis_weights
from fastrlhf.telemetry.metrics import MetricsLogger
from fastrlhf.trainers import common, ppo_checkpoint, ppo_eval
from fastrlhf.trainers.ppo_batch import PPOBatch, build_batch, count_units, loss_weight, split_rows
from fastrlhf.trainers.ppo_checks import (  # noqa: F401  (re-exported)
    PPO_BOOKKEEPING,
    _full,
    check_ppo_config,
    drop_non_finite_rows,
    init_critic_head,
    reduce_metrics,
)
from fastrlhf.trainers.ppo_config import EarlyStopConfig, KLConfig, PPOConfig, RolloutConfig  # noqa: F401
from fastrlhf.trainers.ppo_state import (
    drop_rows_after,
    early_stop_rule,
)

__all__ = ["PPOTrainer", "PPOConfig", "RolloutConfig", "KLConfig", "EarlyStopConfig", "cli_main"]


def derive_seed(*parts) -> int:
    """A 63-bit seed hashed from ``parts`` (seed, purpose, iteration, rank): streams for different
    iterations / ranks / purposes are unrelated, and small structured seeds (0, 1, 2, ...) are avoided."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_kl_controller(cfg: KLConfig):
    if cfg.controller == "adaptive":
        return AdaptiveKLController(cfg.init_coef, cfg.target, cfg.horizon)
    if cfg.controller == "step":
        return StepKLController(
            cfg.init_coef,
            cfg.target,
            factor=cfg.step_factor,
            tolerance=cfg.step_tolerance,
            min_coef=cfg.min_coef,
            max_coef=cfg.max_coef,
        )
    return FixedKLController(cfg.init_coef)


@contextlib.contextmanager
def _eval_mode(model):
    """``model.eval()`` inside (HF generate keeps its KV cache only outside checkpointed train mode);
    the previous mode after. Dropout is 0 either way, so the function computed is the same."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class PPOTrainer:
    """``PPOTrainer(config, actor=, ref=, reward_model=, critic=, tokenizer=, prompts=).train()``.

    ``actor`` / ``ref``: HF causal LMs (or ``PolicyWithLoss``);
    ``reward_model``: ``forward(ids, mask) -> [B]``;
    ``critic``: ``forward(ids, mask) -> [B, T]`` (``ValueModel``), None with ``shared_critic``.
    ``prompts``: strings or token-id lists. ``gold_fn(prompt, response) -> float`` (optional) is a hidden
    scorer logged as ``gold_reward``; it never feeds the rewards. ``eval_prompts`` / ``eval_texts``:
    held-out prompts for ``config.eval_every`` (``evaluate``). After ``train()``, ``finish()`` writes
    ``final/``, ``critic/``, ``ppo_result.json`` and ``plots/``.
    ``reward_fns`` (a ``fastrlhf.algo.RewardFunctions``): Python reward functions added to the reward
    model's score (``reward_model`` may then be None); ``prompt_fields``: one dict per prompt (the other
    fields of its data row, e.g. ``answer``) handed to them. With a critic-free ``advantage_estimator``
    pass ``critic=None``: no critic, no value head, no value loss.
    """

    def __init__(
        self,
        config: PPOConfig,
        *,
        actor,
        ref,
        reward_model,
        critic,
        tokenizer,
        prompts: Sequence,
        runtime: rt.Runtime | None = None,
        rollout=None,
        gold_fn: Callable | None = None,
        output_dir: str | Path | None = None,
        prompt_texts: Sequence[str] | None = None,
        reward_fns: Callable | None = None,
        prompt_fields: Sequence[dict] | None = None,
        eval_prompts: Sequence | None = None,
        eval_texts: Sequence[str] | None = None,
    ):
        self.config = cfg = config
        self.runtime = runtime or rt.init_runtime()
        self.tokenizer = tokenizer
        self.gold_fn = gold_fn
        self.output_dir = Path(output_dir or cfg.output_dir)
        self.critic_free = not needs_critic(cfg.advantage_estimator)
        if self.critic_free and critic is not None:
            raise ValueError(f"advantage_estimator={cfg.advantage_estimator!r} is critic-free: "
                             "pass critic=None")
        if not self.critic_free and cfg.shared_critic == (critic is not None):
            raise ValueError("pass critic=None exactly when config.shared_critic is True")
        if reward_model is None and reward_fns is None:
            raise ValueError("PPOTrainer needs a reward_model, reward_fns, or both")
        self.reward_fns = reward_fns
        check_ppo_config(cfg, self.output_dir)  # before any model is touched
        if critic is not None:
            init_critic_head(critic, reward_model)
        self.lora = cfg.lora_rank > 0
        if self.lora and ref is not None:
            raise ValueError("with lora_rank > 0 the reference is the actor with its adapters disabled: "
                             "pass ref=None")
        if not self.lora and ref is None:
            raise ValueError("PPOTrainer needs a ref model (or lora_rank > 0: the actor without adapters)")
        common.set_seed(cfg.seed)
        # log-probs under the sampling temperature (greedy sampling reports temperature-1 log-probs)
        wrap = dict(temperature=cfg.rollout.temperature or 1.0, backend=cfg.kernel_backend)
        actor = (
            actor
            if isinstance(actor, PolicyWithLoss)
            else PolicyWithLoss(actor, shared_critic=cfg.shared_critic, **wrap)
        )
        if ref is not None:
            ref = ref if isinstance(ref, PolicyWithLoss) else PolicyWithLoss(ref, **wrap)
        if self.lora:  # adapters on actor and critic before placement (FSDP2 shards the adapted models)
            actor = common.maybe_apply_lora(cfg, actor)
            critic = common.maybe_apply_lora(cfg, critic) if critic is not None else None
        # Actor and critic stay in train mode (HF gradient checkpointing runs only there) with every dropout
        # probability at 0: old log-probs, values and the first epoch's new ones come from the same
        # function, so the PPO ratio starts at exactly 1.
        self.actor, self.critic, self.ref, self.reward_model = rt.prepare_models(
            self.runtime, actor=actor, critic=critic, ref=ref, reward_model=reward_model,
            precision=cfg.precision, gradient_checkpointing=cfg.gradient_checkpointing, offload=cfg.offload,
            config=cfg,  # the token budget the memory plan counts activations for
            fsdp=False if self.lora and self.runtime.world_size == 1 else None,  # LoRA in 1 process: plain
        )
        self._setup_prompts(prompts, prompt_texts)
        self.eos_token_ids = rt.eos_token_ids(self.actor, tokenizer)
        engine_kwargs = self._rollout_kwargs()  # checked even when an engine is passed in
        self.rollout = rollout or rt.make_rollout(self.runtime, cfg.rollout.backend, self.actor, tokenizer,
                                                  **engine_kwargs)
        fields = list(prompt_fields) if prompt_fields is not None else [{} for _ in prompts]
        if len(fields) != len(prompts):
            raise ValueError(f"{len(fields)} prompt_fields for {len(prompts)} prompts")
        self.prompt_fields = fields[self.runtime.rank :: self.runtime.world_size]
        self._setup_optim()
        self.kl_ctl = build_kl_controller(cfg.kl)
        self.moments = RunningMoments()
        self.counters = {"skipped_rollouts": 0, "skipped_steps": 0, "reward_errors": 0}
        self.warned_non_finite = False
        self.stop_state = {
            "base_length": None,
            "score_ema": None,
            "falling": 0,
            "stopped": None,
        }
        self.logger = MetricsLogger(self.output_dir, enabled=self.runtime.is_main,
                                    tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                    run_config=common.config_snapshot(cfg, ()))
        ppo_eval.setup_eval(self, eval_prompts, eval_texts)
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------- setup
    def _setup_prompts(self, prompts, prompt_texts):
        # text prompts get the tokenizer's leading specials (BOS) exactly as SFT / RM features do
        encoded = [list(p) if not isinstance(p, str) else prompt_features(p, self.tokenizer)["input_ids"]
                   for p in prompts]
        texts = (
            list(prompt_texts)
            if prompt_texts is not None
            else [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        )
        for i, e in enumerate(encoded):
            if not 1 <= len(e) <= self.config.max_prompt_length:
                raise ValueError(f"prompt {i} has {len(e)} tokens; need 1..{self.config.max_prompt_length}")
        self._longest_prompt = max((len(e) for e in encoded), default=1)
        rank, world = self.runtime.rank, self.runtime.world_size
        # each rank owns a fixed shard; the order inside it is a (seed, rank, epoch) permutation
        self.prompt_ids, self.prompt_texts = encoded[rank::world], texts[rank::world]
        if not self.prompt_ids:
            raise ValueError(f"rank {rank} got no prompts ({len(encoded)} prompts for {world} ranks)")

    def _rollout_kwargs(self) -> dict:
        """The engine's settings, checked against the actor's config (positions, KV budget) first."""
        r = self.config.rollout
        max_len = check_rollout_against_model(
            self.config, config_dict(self.actor.config), device=self.runtime.device,
            world_size=self.runtime.world_size, prompt_length=self._longest_prompt)
        return dict(bucket_mb=r.bucket_mb, gpu_memory_utilization=r.gpu_memory_utilization,
                    max_model_len=max_len,
                    tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager,
                    max_num_seqs=r.max_num_seqs, sleep_level=r.sleep_level, dtype=r.dtype,
                    sync=False)  # train() syncs once before the first generation

    def _setup_optim(self):
        cfg = self.config
        rows = cfg.rollout_batch_size * cfg.rollout.n  # minibatch_size counts responses
        steps = cfg.iterations * cfg.ppo_epochs * math.ceil(rows / cfg.minibatch_size)
        adam = dict(weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
        self.optimizers = {"actor": common.build_optimizer(self.actor, lr=cfg.actor_lr, **adam)}
        if self.critic is not None:
            self.optimizers["critic"] = common.build_optimizer(self.critic, lr=cfg.critic_lr, **adam)
        self.schedulers = {
            k: common.build_scheduler(
                o, cfg.lr_scheduler, num_training_steps=max(steps, 1), warmup_ratio=cfg.warmup_ratio
            )
            for k, o in self.optimizers.items()
        }
        for name, opt in self.optimizers.items():  # the memory plan may offload their state between phases
            self.runtime.register_optimizer(name, opt)

    def optimized(self) -> dict:
        models = {"actor": self.actor, "critic": self.critic}
        return {k: (models[k], o) for k, o in self.optimizers.items()}

    def finish(self) -> dict:
        """After :meth:`train`: ``final/``, ``critic/``, ``ppo_result.json``, ``plots/`` (``ppo_eval.finish``)."""
        return ppo_eval.finish(self)

    def evaluate(self, step: int) -> dict:
        """The current policy on the held-out prompts, logged as ``eval_*`` (``ppo_eval.evaluate``)."""
        return ppo_eval.evaluate(self, step)

    def save_final(self, directory: str | Path | None = None) -> Path:
        """The trained policy in HF format (default ``output_dir/final``)."""
        return ppo_checkpoint.export_policy(self, directory or self.output_dir / "final")

    # ---------------------------------------------------------------------------------------- the loop
    def train(self) -> list[dict]:
        """Run (or resume) ``config.iterations`` iterations; returns this process's logged metric rows."""
        cfg = self.config
        check_ppo_config(cfg, self.output_dir)
        if self.runtime.is_main:
            common.write_config(self.output_dir / "ppo_config.json",
                                common.config_snapshot(cfg, PPO_BOOKKEEPING))
        self.runtime.barrier()
        start = self._resume()
        # an engine with its own weights (vLLM) starts from dummy or stale ones: fill it before generating
        rt.sync_weights(self.runtime, self.actor, self.rollout)
        bar = tqdm(range(start, cfg.iterations), desc="ppo", total=cfg.iterations, initial=start,
                   disable=not (cfg.progress and self.runtime.is_main))
        for it in bar:
            if self.stop_state["stopped"] is not None:
                break
            metrics = self.iteration(it)
            self.history.append(metrics)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("rm_score", "kl", "gold_reward") if k in metrics},
                            refresh=False)
            last = it + 1 == cfg.iterations or self.stop_state["stopped"] is not None
            if self.eval_prompt_ids and cfg.eval_every and ((it + 1) % cfg.eval_every == 0 or last):
                self.evaluate(it + 1)
            if (it + 1) % cfg.checkpoint_every == 0 or last:
                ppo_checkpoint.save_sharded(self, it + 1)
        self.logger.close()
        return self.history

    def iteration(self, it: int) -> dict:
        _cfg, sched = self.config, self.runtime.scheduler
        prompt_rows = self._prompt_rows(it)
        prompts = [self.prompt_ids[i] for i in prompt_rows]
        self._refill_engine()
        # 1. generate
        with sched.phase("generate"), _eval_mode(self.actor):  # KV cache on, no checkpointing
            gen = self.rollout.generate(prompts, self._sampling_params(it))
        batch = build_batch(prompts, gen, pad_token_id=self.tokenizer.pad_token_id,
                            device=self.runtime.device, eos_token_ids=self.eos_token_ids)
        trunc = {"truncated_fraction": batch.truncated.float().mean()}
        # 2. score (rows with a non-finite score, log-prob or value are dropped, the rest trains)
        with sched.phase("score"):
            # rollout.n responses per prompt (rows of a prompt adjacent): the prompt row of every response
            scores, score_stats = self.score(batch, [prompt_rows[g] for g in batch.group.tolist()])
            if self._reward_functions_failed(score_stats):  # a reward function raised: skip the rollout
                self.counters["skipped_rollouts"] += 1
                return self._log(it, {"skipped_rollouts": self.counters["skipped_rollouts"],
                                      "reward_errors": self.counters.get("reward_errors", 0)})
            self._check_dropped(it, score_stats)
            kl_stats = self.advantages(batch, scores)
        # the early-stop rules judge this rollout (the current policy) before its update is applied
        if self._check_early_stop(it, score_stats, kl_stats):
            return self._log(it, {**score_stats, **kl_stats, **trunc, **self._gold(prompt_rows, batch)},
                             batch=batch)
        # 3. train
        with sched.phase("train"):
            train_stats = self.train_epochs(self._filtered(batch, scores), it)
        kl_now = float(kl_stats["kl"])
        self.kl_ctl.update(kl_now, n_steps=batch.size * self.runtime.world_size)
        # 4. sync
        with sched.phase("sync"):
            rt.sync_weights(self.runtime, self.actor, self.rollout)
        metrics = {**score_stats, **kl_stats, **train_stats, **trunc, **self._gold(prompt_rows, batch)}
        return self._log(it, metrics, batch=batch)

    def _refill_engine(self) -> None:
        """An engine whose weights sleep level 2 discarded with no sync since (an iteration that stopped
        before its update, an evaluation) is refilled with the unchanged policy before generating."""
        if not getattr(self.rollout, "weights_valid", True):
            rt.sync_weights(self.runtime, self.actor, self.rollout)

    # ------------------------------------------------------------------------------- 1-2: data, score
    def _prompt_rows(self, it: int) -> list[int]:
        """This rank's prompts for iteration ``it``: a window of an endless sequence of epoch orders."""
        n, bsz = len(self.prompt_ids), self.config.rollout_batch_size
        seed = derive_seed(self.config.seed, "prompts", self.runtime.rank) % 2**31
        rows, cache = [], {}
        for k in range(it * bsz, (it + 1) * bsz):
            epoch, i = divmod(k, n)
            if epoch not in cache:
                cache[epoch] = common.epoch_order(n, seed=seed, epoch=epoch)
            rows.append(cache[epoch][i])
        return rows

    def _sampling_params(self, it: int) -> SamplingParams:
        r = self.config.rollout
        seed = derive_seed(self.config.seed, "rollout", it, self.runtime.rank)
        return SamplingParams(
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            seed=seed,
            n=r.n,
        )

    @torch.no_grad()
    def score(self, batch: PPOBatch, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, dict]:
        """Fill old / ref log-probs and values of ``batch``; return scores ``[B]`` (reward model plus reward
        functions of the prompts ``rows``) and score stats."""
        ids, attn, p_len, mask = batch.input_ids, batch.attention_mask, batch.prompt_len, batch.mask
        # micro-batches as in training (micro_batch_size rows or max_tokens_per_micro_batch tokens): activations
        # here must fit the same budget; a padding micro-batch (a rank with fewer bins' worth of rows) is dropped
        micro = self._micro_rows(attn)
        old_lp, entropy, values, scores, ref_lp = self._score_model_by_model(ids, attn, p_len, micro)
        zero = torch.zeros((), device=ids.device)
        if scores is None:  # no reward model: the reward functions alone
            scores = torch.zeros(batch.size, device=ids.device)
        fn_failed = None
        if self.reward_fns is not None:
            fn_scores = self._function_rewards(batch, rows)
            fn_failed = torch.tensor(float(fn_scores is None))
            if fn_scores is not None:
                scores = scores + fn_scores.to(scores.device)
        keep = drop_non_finite_rows(mask, scores, old_lp, ref_lp, values)
        batch.mask = mask = mask & keep[:, None]
        scores = torch.where(keep, scores, zero)
        batch.old_logprobs = torch.where(mask, old_lp, zero)
        batch.ref_logprobs = torch.where(mask, ref_lp, zero)
        batch.old_values = torch.where(mask, values, zero) if values is not None else torch.zeros_like(old_lp)
        batch.keep = keep
        diff = (batch.sampler_logprobs - batch.old_logprobs).abs()
        n_keep = keep.sum().float()
        stats = {
            "rm_score": scores.sum() / n_keep.clamp(min=1),
            "rm_score_sq": (scores * scores).sum() / n_keep.clamp(min=1),  # for the pooled std (_log)
            "rm_score_n": n_keep,
            "response_length": mask.sum(-1).float().sum() / n_keep.clamp(min=1),
            "entropy": masked_mean(torch.where(mask, entropy, zero), mask),
            "logprob_mismatch_abs": masked_mean(diff, mask),
            "logprob_mismatch_max": torch.where(mask, diff, zero).max(),
            "dropped_rows": (~keep).sum().float(),
        }
        if fn_failed is not None:
            stats["reward_fn_failed"] = fn_failed
        return scores, stats

    def _score_model_by_model(self, ids, attn, p_len: int, micro: list[tuple[torch.Tensor, bool]]):
        """Actor log-probs and entropy, reference log-probs, RM scores and values of the batch, one model after
        another over all micro-batches (actor, reference, reward model, critic), each inside
        ``scheduler.onloaded``: a model the memory plan onloads only for its own turn ("sequential") crosses
        to the device once per iteration, before its first forward (so before FSDP2's pre-forward
        all-gather), and back after its last. Every rank runs every micro-batch, padding ones included (FSDP2's
        all-gathers are collectives); padding micro-batches are dropped here. Returns full-batch tensors
        ``(old_lp, entropy, values, scores, ref_lp)`` in row order (``values`` / ``scores`` may be None)."""
        sched, pk, device = self.runtime.scheduler, self._packing, self.runtime.device

        def each(name: str, model, fn) -> torch.Tensor | None:
            if model is None:
                return None
            with sched.onloaded(name), common.autocast(device, self.runtime.autocast_bf16):
                outs = [fn(model, ids[rows], attn[rows]) for rows, _ in micro]
            return [o for o, (_, pad) in zip(outs, micro, strict=True) if not pad]

        def logprobs(model, i, a):
            return model(i, a, mode="logprobs", prompt_len=p_len, **pk(model))

        actor = each("actor", self.actor, logprobs)  # (log-probs, entropy, values of a shared critic head)
        old_lp, entropy, values = ([o[k] for o in actor] for k in range(3))
        if self.ref is not None:
            ref_lp = each("ref", self.ref, lambda m, i, a: logprobs(m, i, a)[0])
        else:  # LoRA: the reference is the actor's base model (no fourth model)
            from fastrlhf.models.lora import adapters_disabled
            with adapters_disabled(self.actor):
                ref_lp = each("actor", self.actor, lambda m, i, a: logprobs(m, i, a)[0])
        scores = each("reward", self.reward_model, lambda m, i, a: m(i, a, **pk(m)).float())
        if self.critic is not None:
            values = each("critic", self.critic, lambda m, i, a: m(i, a, **pk(m))[:, p_len - 1 : -1].float())
        order = torch.cat([r for r, pad in micro if not pad])  # bins need not hold consecutive rows
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        old_lp, entropy, values, scores, ref_lp = (
            torch.cat(x)[inverse] if x is not None and x[0] is not None else None
            for x in (old_lp, entropy, values, scores, ref_lp))
        normalize = getattr(self.reward_model, "normalize", None)  # the RM's saved mean/std (RewardModel)
        if normalize is not None and scores is not None:
            scores = normalize(scores)
        return old_lp, entropy, values, scores, ref_lp

    def _responses(self, batch: PPOBatch) -> list[str]:
        return [self.tokenizer.decode(r[m], skip_special_tokens=True)
                for r, m in zip(batch.responses.cpu(), batch.mask.cpu(), strict=True)]

    def _function_rewards(self, batch: PPOBatch, rows: Sequence[int] | None) -> torch.Tensor | None:
        """The reward functions' scores ``[B]``; None when one raised or returned a non-finite value
        (``RewardFunctions`` logged the error once; the rollout is then skipped and counted)."""
        rows = list(rows) if rows is not None else list(range(batch.size))
        fields = [{"prompt": self.prompt_texts[i], **self.prompt_fields[i]} for i in rows]
        before = self.reward_fns.errors
        scores = self.reward_fns([self.prompt_texts[i] for i in rows], self._responses(batch), fields)
        # .get: a checkpoint written before reward functions existed has no such counter
        failed = self.reward_fns.errors - before
        self.counters["reward_errors"] = self.counters.get("reward_errors", 0) + failed
        return scores if self.reward_fns.errors == before else None

    def _reward_functions_failed(self, stats: dict) -> bool:
        """Whether a reward function failed on any rank (all ranks then skip the rollout together)."""
        failed = stats.pop("reward_fn_failed", None)
        if failed is None:
            return False
        return float(self.runtime.all_reduce_mean(failed.float().to(self.runtime.device))) > 0

    def _packing(self, model) -> dict:
        """``{"packing": True}`` for models with a packed forward when ``config.packing`` (else ``{}``)."""
        return {"packing": True} if self.config.packing and getattr(model, "supports_packing", False) else {}

    def _check_dropped(self, it: int, stats: dict) -> None:
        """Count the rows dropped for non-finite values (all ranks); warn once; stop the run with
        ``RunError`` when more than ``max_nonfinite_share`` of the rows of the last ``nonfinite_window``
        iterations were lost."""
        cfg, world = self.config, self.runtime.world_size
        counts = torch.stack([stats["dropped_rows"], stats["rm_score_n"] + stats["dropped_rows"]]).float()
        dropped, total = (self.runtime.all_reduce_mean(counts.to(self.runtime.device)) * world).tolist()
        window = self.stop_state.setdefault("dropped_window", [])
        window.append([dropped, total])
        del window[: -cfg.nonfinite_window]
        if dropped and not self.warned_non_finite and self.runtime.is_main:
            self.warned_non_finite = True
            print(f"[ppo] warning: iteration {it + 1}: {dropped:.0f} of {total:.0f} rows have a non-finite "
                  "reward score (or log-prob / value); they are dropped from the rollout (metric dropped_rows)",
                  flush=True)
        lost, seen = sum(d for d, _ in window), sum(n for _, n in window)
        if seen and lost / seen > cfg.max_nonfinite_share:
            raise RunError(f"non-finite reward scores: {lost:.0f} of {seen:.0f} rows of the last "
                           f"{len(window)} iteration(s) were dropped (more than max_nonfinite_share="
                           f"{cfg.max_nonfinite_share}); check the reward model (its dtype, its inputs)")

    def _all_finite(self, *tensors) -> bool:
        dev = self.runtime.device
        bad = torch.stack(
            [(~torch.isfinite(t)).sum().float().to(dev) for t in tensors if t is not None]
        ).sum()
        return float(self.runtime.all_reduce_mean(bad)) == 0.0

    @torch.no_grad()
    def advantages(self, batch: PPOBatch, scores: torch.Tensor) -> dict:
        """normalize_rewards -> token_rewards -> the advantage estimator (``gae`` then whitening, or a
        critic-free one) -> DAPO's group filter; fills batch.advantages / returns."""
        cfg, mask = self.config, batch.mask
        if cfg.missing_eos_penalty:  # responses cut at max_new_tokens: the RM never saw them unfinished
            scores = missing_eos_penalty(scores, batch.truncated, cfg.missing_eos_penalty)
        keep = getattr(batch, "keep", None)
        keep = keep if keep is not None else torch.ones_like(scores, dtype=torch.bool)
        norm = torch.zeros_like(scores)  # dropped rows: no reward, no token counts, not in the moments
        norm[keep] = normalize_rewards(
            scores[keep],
            mode=cfg.reward_norm,
            lengths=mask[keep].sum(-1).clamp(min=1),
            clip=cfg.reward_clip,
            stats=self.moments,
        )
        rewards, _ = token_rewards(
            norm, batch.old_logprobs, batch.ref_logprobs, mask, kl_coef=self.kl_ctl.value, kl_kind=cfg.kl.kind
        )
        adv, ret = compute_advantages(
            cfg.advantage_estimator, scores=norm, rewards=rewards, values=batch.old_values, mask=mask,
            group_size=cfg.rollout.n, gamma=cfg.gamma, lam=cfg.lam, norm_std=cfg.grpo_norm_std,
            whiten=self._whiten, backend=cfg.kernel_backend,
        )
        batch.returns = ret
        whiten = cfg.whiten_advantages and not self.critic_free  # critic-free estimators normalise themselves
        batch.advantages = self._whiten(adv, mask) if whiten else adv
        tis = {}
        if cfg.rollout_correction == "tis":  # loss_t * w_t, folded into A_t (see rollout/correction.py)
            w, tis = tis_weights(batch.old_logprobs, batch.sampler_logprobs, mask, cap=cfg.tis_cap)
            batch.advantages = apply_tis(batch.advantages, w)
        extra = {}
        if cfg.filter_groups:
            extra["filtered_fraction"] = 1.0 - filter_groups(scores, cfg.rollout.n).float().mean()
        # KL to the reference, per sequence: sum over the response of log pi - log ref (k1), mean over rows
        seq_kl = (batch.old_logprobs - batch.ref_logprobs).sum(-1).sum() / keep.sum().clamp(min=1)
        kl = self.runtime.all_reduce_mean(seq_kl)
        return {
            "kl": kl,
            "kl_coef": torch.tensor(self.kl_ctl.value),
            "reward_normalized": norm.sum() / keep.sum().clamp(min=1),
            "advantage_mean": masked_mean(adv, mask),
            "advantage_std": masked_var(adv, mask).sqrt(),
            "return_mean": masked_mean(ret, mask),
            "value_mean": masked_mean(batch.old_values, mask),
            **extra,
            **tis,
        }

    def _filtered(self, batch: PPOBatch, scores: torch.Tensor) -> PPOBatch:
        """DAPO dynamic sampling (``filter_groups``): rows of groups whose scores are all equal leave the
        loss (mask cleared). They keep their place, so every rank takes the same number of steps."""
        if not self.config.filter_groups:
            return batch
        keep = filter_groups(scores, self.config.rollout.n)
        return dataclasses.replace(batch, mask=batch.mask & keep[:, None])

    def _whiten(self, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Advantage whitening over the valid tokens of the global batch (all ranks)."""
        group = torch.distributed.group.WORLD if self.runtime.world_size > 1 else None
        return masked_whiten(adv, mask, group=group)

    # ----------------------------------------------------------------------------------------- 3. train
    def train_epochs(self, batch: PPOBatch, it: int) -> dict:
        cfg = self.config
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatches", it))
        totals: dict[str, torch.Tensor] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(batch.size, generator=gen).to(batch.input_ids.device)
            for rows in split_rows(order, cfg.minibatch_size):
                stats = self.train_minibatch(batch.select(rows))
                if not stats:  # a skipped step contributes nothing to the averages
                    continue
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                n += 1
        for opt in self.optimizers.values():  # free the grads before SYNC / GENERATE / the next SCORE
            opt.zero_grad(set_to_none=True)
        out = {k: v / n for k, v in totals.items()}
        out["skipped_steps"] = torch.tensor(float(self.counters["skipped_steps"]))
        out["lr_actor"] = torch.tensor(self.schedulers["actor"].get_last_lr()[0])
        return out

    def minibatch_loss(self, mb: PPOBatch, *, backward: bool = True) -> tuple[torch.Tensor, dict]:
        """Sum over micro-batches of weight * loss (== the minibatch's loss); backward per micro-batch."""
        cfg = self.config
        # loss_agg is over the *global* minibatch: FSDP averages gradients over ranks, so each rank's share
        # is its units / the mean units per rank (== world * local / global); one process: local / local
        total = self.runtime.all_reduce_mean(count_units(mb.mask, cfg.loss_agg).float())
        loss_sum = torch.zeros((), device=mb.mask.device)  # stats stay on the device: no sync per micro-batch
        stats: dict[str, torch.Tensor] = {}
        for rows, pad in self._micro_rows(mb.attention_mask):
            micro = mb.select(rows)
            # a padding micro-batch (every rank runs as many as the rank with the most) adds nothing
            w = loss_weight(micro.mask, total, cfg.loss_agg) * (0.0 if pad else 1.0)
            with common.autocast(self.runtime.device, self.runtime.autocast_bf16):
                loss, st = self._micro_loss(micro)
            if backward:
                (w * loss).backward()
            loss_sum = loss_sum + w * loss.detach()
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + w * v.detach()
        return loss_sum, stats

    def _micro_rows(self, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
        """Row indices of each micro-batch, with a flag for padding micro-batches: ``micro_batch_size``
        consecutive rows, or with ``max_tokens_per_micro_batch`` a balanced bin-packing of the rows' valid
        tokens (``packing.balanced_micro_batches``) with as many bins on every rank as on the rank that needs
        the most (all-reduced max; a rank short of rows runs its first row again as padding, weight 0)."""
        dev, cfg = attention_mask.device, self.config
        if cfg.max_tokens_per_micro_batch is None:
            return [(r, False) for r in split_rows(torch.arange(attention_mask.shape[0], device=dev),
                                                   cfg.micro_batch_size)]
        from fastrlhf.models.packing import balanced_micro_batches
        lengths = attention_mask.sum(-1).tolist()
        k = 1
        while True:  # until every rank has the global max (LPT may need one more bin than asked: repeat);
            # the loop's decision depends on global values only, so every rank all-reduces equally often
            bins = balanced_micro_batches(lengths, cfg.max_tokens_per_micro_batch, min_bins=k)
            n = torch.tensor(float(len(bins)), device=dev)
            if self.runtime.world_size > 1:
                torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
            if int(n) == k:
                break
            k = int(n)
        return [(torch.tensor(b if b else [0], device=dev, dtype=torch.long), not b) for b in bins]

    def _micro_loss(self, micro: PPOBatch) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        pg_loss, stats, values = self.actor(
            micro.input_ids,
            micro.attention_mask,
            mode="loss",
            prompt_len=micro.prompt_len,
            old_logprobs=micro.old_logprobs,
            advantages=micro.advantages,
            mask=micro.mask,
            ref_logprobs=micro.ref_logprobs if cfg.kl.loss_coef else None,
            kl_coef=cfg.kl.loss_coef,
            kl_kind=cfg.kl.loss_kind,
            entropy_coef=cfg.entropy_coef,
            clip_low=cfg.clip,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            loss_agg=cfg.loss_agg,
            log_ratio_clip=cfg.log_ratio_clip,
            policy_loss=cfg.policy_loss,
            **self._packing(self.actor),
        )
        if self.critic_free:
            stats = {("policy_" + k if k in ("kl", "entropy") else k): v for k, v in stats.items()}
            return pg_loss, {"pg_loss": pg_loss.detach(), **stats}
        if self.critic is not None:
            values = self.critic(micro.input_ids, micro.attention_mask, **self._packing(self.critic))
            values = values[:, micro.prompt_len - 1 : -1]
        vf_loss, vf_stats = ppo_value_loss(
            values, micro.old_values, micro.returns, micro.mask, clip=cfg.value_clip, loss_agg=cfg.loss_agg
        )
        vf_weight = cfg.vf_coef if self.critic is None else 1.0
        stats = {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), **stats, **vf_stats}
        stats = {("policy_" + k if k in ("kl", "entropy") else k): v for k, v in stats.items()}
        # separate critic: its own optimizer sees only vf_loss (the actor graph does not reach it)
        return pg_loss + vf_weight * vf_loss, stats

    def train_minibatch(self, mb: PPOBatch) -> dict:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss, stats = self.minibatch_loss(mb)
        norms = {"grad_norm_actor": common.clip_grad_norm(self.actor.parameters(), self.config.max_grad_norm)}
        if self.critic is not None:
            norms["grad_norm_critic"] = common.clip_grad_norm(self.critic.parameters(), self.config.max_grad_norm)
        # One check, one host sync: a non-finite loss *or gradient* is never applied (clipping by an inf
        # norm turns the gradients into NaN, and AdamW would write them into the weights).
        if not self._all_finite(loss, *(_full(n) for n in norms.values())):
            self.counters["skipped_steps"] += 1  # grads dropped, optimizers untouched
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            return {}
        stats.update(norms)
        for name, opt in self.optimizers.items():
            opt.step()
            self.schedulers[name].step()
        return stats

    # ------------------------------------------------------------------------------ monitoring, stops
    def _gold(self, rows: list[int], batch: PPOBatch) -> dict:
        if self.gold_fn is None:
            return {}
        responses = self._responses(batch)
        rows = [rows[g] for g in batch.group.tolist()]  # rollout.n responses per prompt
        gold = [self.gold_fn(self.prompt_texts[i], resp) for i, resp in zip(rows, responses, strict=True)]
        return {"gold_reward": torch.tensor(sum(gold) / len(gold))}

    def _log(self, it: int, metrics: dict, batch: PPOBatch | None = None) -> dict:
        row = reduce_metrics(metrics, self.runtime.device)
        phases = self.runtime.scheduler.pop_stats()
        row.update(phases)
        if batch is not None:
            n_resp = float(batch.mask.sum()) * self.runtime.world_size
            n_all = float(batch.attention_mask.sum()) * self.runtime.world_size
            for phase, n_tok in (
                ("generate", n_resp),
                ("score", n_all),
                ("train", n_all * self.config.ppo_epochs),
            ):
                if phases.get(f"time/{phase}_s"):
                    row[f"tokens_per_s/{phase}"] = n_tok / phases[f"time/{phase}_s"]
        row["iteration"] = it + 1
        return self.logger.log(it + 1, row, stage="ppo")

    def _check_early_stop(self, it: int, score_stats: dict, kl_stats: dict) -> bool:
        """Evaluate-first: the rules see this rollout's KL, length and RM score (of the current policy,
        all ranks) before its update; when one fires, the update is not applied, so the saved policy is
        the one that was measured, never one update past the limit."""
        keys = ("rm_score", "rm_score_sq", "rm_score_n", "response_length")
        pre = reduce_metrics({**{k: score_stats[k] for k in keys}, "kl": kl_stats["kl"]}, self.runtime.device)
        rule = early_stop_rule(self.config.early_stop, self.config.kl.target, self.stop_state, pre)
        if rule is None:
            return False
        self.stop_state["stopped"] = rule
        self.logger.log(it + 1, {"early_stop": rule}, stage="ppo")
        if self.runtime.is_main:
            print(f"[ppo] early stop at iteration {it + 1} (its update not applied): {rule}", flush=True)
        return True

    # -------------------------------------------------------------------------------------- resume
    def bookkeeping_state(self) -> dict:
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "moments": self.moments.state_dict(),
            "counters": dict(self.counters),
            "stop_state": dict(self.stop_state),
        }

    def load_bookkeeping_state(self, extra: dict) -> None:
        self.kl_ctl.load_state_dict(extra["kl_ctl"])
        self.moments.load_state_dict(extra["moments"])
        self.counters = dict(extra["counters"])
        self.stop_state = dict(extra["stop_state"])

    def _resume(self) -> int:
        ckpt = ppo_checkpoint.latest(self.output_dir)
        if ckpt is None:
            return 0
        step = ppo_checkpoint.load_sharded(self, ckpt)
        if self.runtime.is_main:
            drop_rows_after(self.logger.path, step)
            drop_rows_after(self.output_dir / "eval_samples.jsonl", step)
            print(f"[ppo] resumed from {ckpt} (iteration {step})", flush=True)
        return step


def cli_main(config_path: str, overrides: Sequence[str] = ()) -> int:
    """``fastrlhf ppo --config FILE [key=value ...]`` on HF models (see ``fastrlhf.trainers.ppo_cli``)."""
    from fastrlhf.trainers.ppo_cli import run_from_config

    return run_from_config(config_path, overrides)

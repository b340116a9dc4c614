"""Reward-model training: a Bradley-Terry model of pairwise preferences (stage 2 of RLHF).

The reward model is the SFT backbone with ``Linear(hidden, 1)`` read at the last real token
(:class:`fastrlhf.models.RewardModel`). For pairs (x, y_c, y_r) with y_c preferred, the loss over a batch is

    L = -mean log sigmoid(r(x, y_c) - r(x, y_r) - m)      (+ c * mean (r_c + r_r)^2 when centring)

with an optional per-pair margin m (Touvron et al. 2023, Llama 2 §3.2.2) and an optional centring
term that keeps rewards near 0 (Eisenstein et al. 2023). Ouyang et al. 2022 (InstructGPT) §3.5 for the
recipe: one epoch, lr ~9e-6, all comparisons of a prompt in one batch when possible.
Judged by held-out accuracy, margin, calibration (ECE) and the separation of chosen vs rejected rewards.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel

from fastrlhf.algo import bradley_terry_loss, expected_calibration_error
from fastrlhf.config import ConfigError
from fastrlhf.data import pad_batch, preference_features
from fastrlhf.models.heads import HEAD_FILE, RewardModel, load_head_model
from fastrlhf.models.loading import load_tokenizer
from fastrlhf.models.multihead import MultiHeadRewardModel
from fastrlhf.telemetry.report import plot_reward_histogram
from fastrlhf.trainers import common

STAGE = "rm"


@dataclass(frozen=True)
class RewardConfig(common.StageConfig):
    """Every reward-model setting, with its default. ``model`` (the SFT checkpoint), ``data`` and
    ``output_dir`` are required. Rows: ``{"prompt", "chosen", "rejected"}`` and an optional ``margin``
    (used when ``use_margin``). ``chat_template`` as in ``SFTConfig`` (keep it equal across stages).
    ``heads`` (e.g. ``[helpful, harmless]``) trains a ``MultiHeadRewardModel``: every row then names its
    objective in ``"head"``, the pair trains that head, and the saved score is the ``head_weights``
    combination (equal weights by default; change it later with ``set_weights``).
    ``batch_size`` pairs per optimizer step, ``micro_batch_size`` pairs per
    forward (2x that many sequences), or with ``max_tokens_per_micro_batch`` as many pairs as fit that many
    tokens (both sides counted); ``packing`` runs them as one packed sequence of their valid tokens
    (``fastrlhf.models.packing``: equal scores, no padding multiplied; a multi-head pair batch is not
    packed). The final model goes to ``output_dir/final`` with the mean/std of its
    rewards on the eval pairs (the train pairs when there is no eval set) for normalisation at PPO time.
    """

    lr: float = 9e-6
    use_margin: bool = True
    heads: tuple[str, ...] = ()
    head_weights: tuple[float, ...] = ()
    center_rewards_coef: float = 0.0
    ece_bins: int = 10
    packing: bool = True  # score the valid tokens of each pair batch packed (rows' attention kept apart)

    def __post_init__(self):
        super().__post_init__()
        if self.head_weights and len(self.head_weights) != len(self.heads):
            raise ConfigError(f"RewardConfig: {len(self.head_weights)} head_weights for heads "
                              f"{list(self.heads)}")
        budget = self.max_tokens_per_micro_batch
        if budget is not None and budget < 2 * self.max_length:
            raise ConfigError(f"RewardConfig: max_tokens_per_micro_batch must be >= 2 * max_length = "
                              f"{2 * self.max_length} (a pair is two sequences), got {budget}")
        if len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"RewardConfig: heads must be distinct, got {list(self.heads)}")


def pair_features(row: dict, tokenizer, max_length: int, *, chat_template: bool = False,
                  heads: tuple[str, ...] = ()) -> dict:
    """``{"chosen_input_ids", "rejected_input_ids", ..., "margin"}`` of one rm row: prompt + response + EOS
    (``preference_features``), the format the policy generates in, so PPO scores what the reward model
    was trained on. A row without ``margin`` gets 0. With ``heads``, ``"head"`` is the index of the
    row's ``"head"`` name among them (a missing or unknown name is a ``ValueError``)."""
    prompt = common.format_prompt(tokenizer, row["prompt"], chat_template=chat_template)
    margin = row.get("margin")
    out = preference_features(prompt, row["chosen"], row["rejected"], tokenizer, max_length=max_length,
                              margin=float(margin) if margin is not None else 0.0)
    if heads:
        if row.get("head") not in heads:
            raise ValueError(f"'head' must name one of the heads {list(heads)}, got {row.get('head')!r}")
        out["head"] = heads.index(row["head"])
    return out


def pair_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """``[2m, T]`` ``input_ids`` / ``attention_mask`` (m chosen rows, then m rejected) and ``margin [m]``."""
    seqs = [{"input_ids": f[f"{side}_input_ids"], "attention_mask": [1] * len(f[f"{side}_input_ids"])}
            for side in ("chosen", "rejected") for f in features]
    batch = pad_batch(seqs, pad_id, padding_side="right")
    batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
    if "head" in features[0]:
        batch["head"] = torch.tensor([f["head"] for f in features], dtype=torch.long)
    return batch


def score_pairs(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, device: torch.device,
                bf16: bool = False, packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [m], rejected [m])`` fp32 scores of one pair batch, one forward for both sides.

    Pairs with a ``head`` index (multi-head model) are scored by that head alone.
    """
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with common.autocast(device, bf16):
        if "head" in batch:
            per_head = model.head_scores(ids, mask)  # [2m, K]
            scores = per_head.gather(1, batch["head"].to(device).repeat(2)[:, None])[:, 0]
        elif packing and getattr(model, "supports_packing", False):
            scores = model(ids, mask, packing=True)
        else:
            scores = model(ids, mask)
    m = batch["margin"].shape[0]
    return scores[:m].float(), scores[m:].float()


def accumulate_reward_gradients(model, micro_batches: list[dict], *, device: torch.device, bf16: bool = False,
                                use_margin: bool = True, center_coef: float = 0.0, total: int | None = None,
                                grad_scale: float = 1.0, packing: bool = False) -> dict[str, torch.Tensor]:
    """Forward + backward of the batch-mean BT loss over micro-batches (each weighted by its share of
    pairs, so the gradient equals one big batch's). Returns detached ``loss``, ``accuracy``, ``margin``.
    Data parallel: ``total`` is the global pair count, ``grad_scale`` the world size (FSDP2 averages
    gradients), and the returned stats this rank's shares (summed over ranks: the batch means). A
    micro-batch with the key ``dummy`` runs forward and backward with weight 0."""
    if total is None:
        total = sum(int(mb["margin"].shape[0]) for mb in micro_batches if "dummy" not in mb)
    out = {k: torch.zeros((), device=device) for k in ("loss", "accuracy", "margin", "center")}
    for mb in micro_batches:
        chosen, rejected = score_pairs(model, mb, device=device, bf16=bf16, packing=packing)
        share = 0.0 if "dummy" in mb else chosen.shape[0] / total
        margin = mb["margin"].to(device) if use_margin else None
        loss, acc, gap = bradley_terry_loss(chosen, rejected, margin)
        center = ((chosen + rejected) ** 2).mean()
        ((loss + center_coef * center) * (share * grad_scale)).backward()
        for k, v in (("loss", loss), ("accuracy", acc), ("margin", gap), ("center", center)):
            out[k] += v.detach() * share
    return out


@torch.no_grad()
def score_all(model, micro_batches: list[dict], *, device: torch.device, bf16: bool = False,
              combined: bool = False, packing: bool = False) -> dict[str, torch.Tensor]:
    """``chosen``, ``rejected``, ``margin`` (and ``head``) ``[N]`` on CPU for every pair of ``micro_batches``.

    ``combined=True`` scores with the model's own forward (a multi-head model's weighted combination)
    instead of each pair's head.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "margin": [], "head": []}
    for mb in micro_batches:
        if combined:
            mb = {k: v for k, v in mb.items() if k != "head"}
        chosen, rejected = score_pairs(model, mb, device=device, bf16=bf16, packing=packing)
        for key, value in (("chosen", chosen), ("rejected", rejected), ("margin", mb["margin"]),
                           ("head", mb.get("head"))):
            if value is not None:
                parts[key].append(value.cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items() if v}


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, *,
                       n_bins: int = 10) -> dict[str, float]:
    """Held-out BT loss, accuracy, mean margin, ECE and reward statistics of scored pairs (``[N]`` each)."""
    loss, acc, gap = bradley_terry_loss(chosen, rejected, margin)
    both = torch.cat([chosen, rejected])
    return {"eval_loss": float(loss), "eval_accuracy": float(acc), "eval_margin": float(gap),
            "eval_ece": float(expected_calibration_error(chosen, rejected, n_bins)),
            "eval_chosen_mean": float(chosen.mean()), "eval_rejected_mean": float(rejected.mean()),
            "eval_pairs": int(chosen.numel()), "reward_mean": float(both.mean()),
            "reward_std": float(both.std(correction=0))}


class RewardTrainer(common.StepTrainer):
    """``RewardTrainer(config).train() -> dict`` of final held-out metrics (``eval_accuracy``,
    ``eval_margin``, ``eval_ece``, ``eval_loss``, ``reward_mean``, ``reward_std``, ...). Saves
    ``output_dir/final`` (``RewardModel.from_pretrained`` loads it, tokenizer included) and
    ``output_dir/reward_histogram.png`` (chosen vs rejected rewards on the eval pairs).

    With ``config.heads`` the model is a ``MultiHeadRewardModel`` (load it with ``load_head_model`` or
    ``MultiHeadRewardModel.from_pretrained``) and the metrics add ``eval_accuracy_<head>``.

    ``model`` may be a causal LM (its body is used) or a reward model; ``tokenizer``, ``train_rows``
    and ``eval_rows`` may be passed instead of the config's paths.
    """

    stage = STAGE

    def __init__(self, config: RewardConfig, model=None, tokenizer=None, train_rows=None, eval_rows=None,
                 runtime=None):
        self.cfg = cfg = config
        self.setup_runtime(runtime)
        common.set_seed(cfg.seed)
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model, padding_side="right")
        self.prepare_data("rm", train_rows, eval_rows)
        if model is None and self.fsdp:  # rank 0 reads, the others receive their shards
            from fastrlhf.engine.loading import ModelSource
            model = self.load_sharded(common.lora_source(cfg, ModelSource(
                build=self._build_empty, load=lambda: self._build_model(None))))
        self.model = self.place_model(common.maybe_apply_lora(cfg, self._build_model(model)))
        self.setup_loop()

    def _build_model(self, model) -> RewardModel | MultiHeadRewardModel:
        heads = self.cfg.heads
        if isinstance(model, (RewardModel, MultiHeadRewardModel)):
            if heads and getattr(model, "heads", None) != list(heads):
                raise ValueError(f"the model passed in has heads {getattr(model, 'heads', None)}, "
                                 f"the config {heads}")
            return model
        dtype = torch.float32  # fp32 masters; bf16 compute comes from precision
        if model is None and (Path(self.cfg.model) / HEAD_FILE).is_file():  # continue from a reward model
            return self._build_model(load_head_model(self.cfg.model, dtype=dtype))
        if model is None:
            # The body only: the SFT checkpoint's LM head is not needed (and is large for big vocabularies).
            model = AutoModel.from_pretrained(self.cfg.model, dtype=dtype)
        if heads:
            return MultiHeadRewardModel(model, heads, self.cfg.head_weights or None)
        return RewardModel(model)

    def _build_empty(self):
        """The model's structure from the configs alone (built on the meta device by engine.loading)."""
        import json

        from transformers import AutoConfig
        path = Path(self.cfg.model)
        config = AutoConfig.from_pretrained(self.cfg.model)
        body = AutoModel.from_config(config, dtype=torch.float32)
        if (path / HEAD_FILE).is_file():
            meta = json.loads((path / HEAD_FILE).read_text())
            if meta.get("class") == "MultiHeadRewardModel":
                return MultiHeadRewardModel(body, meta["heads"])
            return RewardModel(body, reward_mean=meta.get("reward_mean"), reward_std=meta.get("reward_std"))
        if self.cfg.heads:
            return MultiHeadRewardModel(body, self.cfg.heads, self.cfg.head_weights or None)
        return RewardModel(body)

    def _features(self, rows: list[dict], source: str) -> list[dict]:
        return common.featurize(rows, lambda r: pair_features(r, self.tokenizer, self.cfg.max_length,
                                                             chat_template=self.cfg.chat_template,
                                                             heads=self.cfg.heads),
                                source=source, drop_overlong=self.cfg.drop_overlong)

    def micro_batches(self, features: list[dict]) -> list[dict]:
        pad = self.tokenizer.pad_token_id
        tokens = lambda f: len(f["chosen_input_ids"]) + len(f["rejected_input_ids"])  # noqa: E731
        return [pair_batch(group, pad) for group in self.group_rows(features, tokens)]

    def train_step(self, indices: list[int]) -> dict:
        """One optimizer step on the global batch of pairs ``indices``: this rank's pairs, weighted by
        their share of all ranks' pairs."""
        rows, real = self.local_rows(indices)
        batch = self.even_micro_batches(self.micro_batches([self.train_features[i] for i in rows]), real)
        stats = accumulate_reward_gradients(self.model, batch, device=self.device, bf16=self.autocast_bf16,
                                            use_margin=self.cfg.use_margin, packing=self.cfg.packing,
                                            center_coef=self.cfg.center_rewards_coef,
                                            total=len(indices) if self.world_size > 1 else None,
                                            grad_scale=float(self.world_size))
        stats = {k: self.all_reduce_sum(v) for k, v in stats.items()}
        return {**stats, **self.optimizer_step()}

    def evaluate(self, features: list[dict] | None = None) -> dict:
        features = self.eval_features if features is None else features
        if not features:
            return {}
        s = score_all(self.model, self.micro_batches(features), device=self.device, bf16=self.autocast_bf16,
                      packing=self.cfg.packing)
        self.last_scores = (s["chosen"], s["rejected"])
        metrics = preference_metrics(s["chosen"], s["rejected"], s["margin"] if self.cfg.use_margin else None,
                                     n_bins=self.cfg.ece_bins)
        for i, name in enumerate(self.cfg.heads):
            rows = s["head"] == i
            if rows.any():
                won = s["chosen"][rows] > s["rejected"][rows]
                metrics[f"eval_accuracy_{name}"] = float(won.float().mean())
        return metrics

    def final_evaluate(self) -> dict:
        """Held-out metrics (train pairs when there is no eval set), the reward statistics saved with the
        model, and the histogram of chosen vs rejected rewards."""
        features = self.eval_features or self.train_features
        metrics = self.evaluate(features)
        if self.cfg.heads:  # normalisation stats of the score PPO will see: the weighted combination
            s = score_all(self.model, self.micro_batches(features), device=self.device, bf16=self.autocast_bf16,
                          combined=True, packing=self.cfg.packing)
            both = torch.cat([s["chosen"], s["rejected"]])
            metrics.update(reward_mean=float(both.mean()), reward_std=float(both.std(correction=0)))
        self.model.reward_mean, self.model.reward_std = metrics["reward_mean"], metrics["reward_std"]
        which = "eval" if self.eval_features else "train"
        # eval_* keep their names for consumers; the flag (and the message) say they were measured on train pairs
        metrics["eval_on_train_pairs"] = 0.0 if self.eval_features else 1.0
        if not self.eval_features and self.is_main:
            print("[fastrlhf] rm: no eval_data: eval_* metrics are measured on the training pairs (optimistic)")
        if self.is_main:
            plot_reward_histogram(*self.last_scores, Path(self.cfg.output_dir) / "reward_histogram.png",
                                  title=f"reward model on {which} pairs: accuracy {metrics['eval_accuracy']:.3f}")
        return metrics

    def save_model(self, directory: Path) -> None:
        if self.fsdp:  # collective, streamed a bucket of layers at a time; rank 0 writes
            from fastrlhf.engine.checkpoint import export_head_model
            export_head_model(self.model, directory, tokenizer=self.tokenizer)  # LoRA: merged
            if self.cfg.lora_rank:
                common.save_adapters(self.model, directory)
            return
        self.model.save_pretrained(directory, tokenizer=self.tokenizer)  # adapters merged (heads.py)
        if self.cfg.lora_rank:
            common.save_adapters(self.model, directory)

    def load_model(self, directory: Path) -> None:
        if self.cfg.lora_rank:
            common.load_adapters(self.model, directory)
            loaded = load_head_model(directory, dtype=next(self.model.parameters()).dtype)
            self.model.reward_mean, self.model.reward_std = loaded.reward_mean, loaded.reward_std
            return
        loaded = load_head_model(directory, dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(loaded.state_dict())
        self.model.reward_mean, self.model.reward_std = loaded.reward_mean, loaded.reward_std

    def train(self) -> dict:
        return self.run_loop()


def cli_main(config_path: str, overrides: list[str]) -> int:
    """``fastrlhf rm --config FILE.yaml [key=value ...]``."""
    from fastrlhf.trainers.guard import stage_cli

    return stage_cli(RewardConfig, RewardTrainer, config_path, overrides)


__all__ = ["RewardConfig", "RewardTrainer", "accumulate_reward_gradients", "cli_main", "pair_features",
           "preference_metrics", "score_all"]

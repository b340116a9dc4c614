"""Direct preference optimization: the policy trained on preference pairs with no reward model and no
sampling (Rafailov et al. 2023), and its relatives IPO (Azar et al. 2023) and SimPO (Meng et al. 2024).

For pairs (x, y_c, y_r) the loss is ``fastrlhf.algo.dpo_loss`` of the sequence log-probs
``log pi(y | x) = sum_t log pi(y_t | x, y_<t)`` of the policy and of the frozen reference (the starting
policy unless ``ref_model`` is given). Log-probs come from hidden states and the LM head chunk by chunk
(``linear_token_logprobs``: no ``[B, T, V]`` logits). The reference's log-probs do not change during training:
they are computed once, before the first step, for every train and eval pair, and cached
(``output_dir/dpo_reference_logps.pt``, reused on resume); ``simpo`` needs no reference at all.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrlhf.algo import DPO_LOSSES, dpo_loss
from fastrlhf.config import ConfigError
from fastrlhf.data import IGNORE_INDEX, pad_batch, sft_features
from fastrlhf.kernels import linear_token_logprobs
from fastrlhf.models.heads import position_ids_from_mask
from fastrlhf.models.loading import load_causal_lm, load_tokenizer
from fastrlhf.models.policy import effective_temperature
from fastrlhf.trainers import common

STAGE = "dpo"
REF_CACHE = "dpo_reference_logps.pt"


@dataclass(frozen=True)
class DPOConfig(common.StageConfig):
    """Every DPO setting, with its default. ``model`` (the SFT policy), ``data`` (rows ``{"prompt", "chosen",
    "rejected"}``, as for the reward model) and ``output_dir`` are required. ``loss_type``: ``sigmoid``
    (DPO), ``ipo`` or ``simpo``; ``beta`` the inverse temperature of the implicit reward;
    ``label_smoothing`` the cDPO flip probability (sigmoid and simpo); ``simpo_gamma`` SimPO's target
    margin. ``ref_model``: the frozen reference (default: ``model`` itself, i.e. the starting policy).
    ``batch_size`` pairs per optimizer step, ``micro_batch_size`` pairs per forward (2x sequences), or with
    ``max_tokens_per_micro_batch`` as many pairs as fit that many tokens (both sides counted; a balanced
    bin-packing). ``packing``: each micro-batch's sequences run as packed rows of their valid tokens
    (``fastrlhf.models.packing``; attention kept within each sequence, only response states reach the LM head).
    """

    lr: float = 5e-7
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    ref_model: str | None = None
    kernel_backend: str = "auto"
    packing: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"DPOConfig: loss_type must be one of {DPO_LOSSES}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ConfigError(f"DPOConfig: beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"DPOConfig: label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("DPOConfig: label_smoothing applies to loss_type sigmoid or simpo, not ipo")
        budget = self.max_tokens_per_micro_batch
        if budget is not None and budget < 2 * self.max_length:
            raise ConfigError(f"DPOConfig: max_tokens_per_micro_batch counts both sides of a pair: it must be >= "
                              f"2 * max_length = {2 * self.max_length}, got {budget}")
        if self.kernel_backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"DPOConfig: kernel_backend must be auto|triton|torch, got {self.kernel_backend!r}")


def dpo_pair_features(row: dict, tokenizer, max_length: int, *, chat_template: bool = False) -> dict:
    """``chosen_*`` / ``rejected_*`` ``input_ids``, ``labels`` (-100 on the prompt), ``attention_mask`` of one row:
    prompt + response + EOS, built as SFT builds them (so the policy is scored in the format it generates).
    Never cut, as for the reward model: a side longer than ``max_length`` is a ``ValueError`` naming it (the
    trainer drops such pairs with a count, or stops with ``drop_overlong: false``)."""
    prompt = common.format_prompt(tokenizer, row["prompt"], chat_template=chat_template)
    out = {}
    for side in ("chosen", "rejected"):
        f = sft_features(prompt, row[side], tokenizer)
        if len(f["input_ids"]) > max_length:
            raise ValueError(f"prompt + {side} + EOS is {len(f['input_ids'])} tokens, more than "
                             f"max_length={max_length}")
        for key in ("input_ids", "labels", "attention_mask"):
            out[f"{side}_{key}"] = f[key]
    return out


def dpo_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """``[2m, T]`` right-padded ``input_ids`` / ``labels`` / ``attention_mask``: m chosen rows, then m rejected."""
    seqs = [{k: f[f"{side}_{k}"] for k in ("input_ids", "labels", "attention_mask")}
            for side in ("chosen", "rejected") for f in features]
    return pad_batch(seqs, pad_id, padding_side="right")


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, backend: str = "auto",
                   packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of log pi over each row's response tokens [N] fp32, response tokens per row [N])`` of a causal
    LM on a padded batch, from hidden states and the LM head (``linear_token_logprobs``, no logits tensor).
    ``packing``: the rows' valid tokens run as packed rows (``models.packing``, block-causal attention) and
    only the states that predict a response token reach the head; equal to the padded path."""
    head = model.get_output_embeddings()
    temperature = effective_temperature(model.config, 1.0)
    targets = batch["labels"] != IGNORE_INDEX  # [N, T]: the response tokens (labels are the input ids there)
    if packing:
        from fastrlhf.models.packing import pack_for, packed_hidden
        packed = pack_for(model.config, batch["input_ids"], batch["attention_mask"])
        hidden = packed.gather(packed_hidden(model.get_decoder(), packed), targets, shift=-1)  # [n, H]
        bias = head.bias.to(hidden.dtype) if getattr(head, "bias", None) is not None else None
        lp = linear_token_logprobs(hidden[None], head.weight.to(hidden.dtype), batch["input_ids"][targets][None],
                                   bias=bias, temperature=temperature, backend=backend)[0]
        per_row = lp.new_zeros(targets.shape).masked_scatter(targets, lp)
        return per_row.sum(-1), targets.sum(-1)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
    hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1]
    bias = head.bias.to(hidden.dtype) if getattr(head, "bias", None) is not None else None
    labels = batch["labels"][:, 1:]
    lp = linear_token_logprobs(hidden, head.weight.to(hidden.dtype), labels, bias=bias, ignore_index=IGNORE_INDEX,
                               temperature=temperature, backend=backend)
    return lp.sum(-1), (labels != IGNORE_INDEX).sum(-1)


class DPOTrainer(common.StepTrainer):
    """``DPOTrainer(config).train() -> dict`` of final metrics (``eval_loss``, ``eval_reward_accuracy``,
    ``eval_reward_margin``, ...; on the train pairs when there is no eval set). Saves ``output_dir/final``
    (``AutoModelForCausalLM.from_pretrained`` loads it, tokenizer included).

    ``model`` / ``ref_model`` (HF causal LMs), ``tokenizer``, ``train_rows`` and ``eval_rows`` may be passed
    in instead of the config's paths (the demo does). Without a reference, the starting ``model`` is the
    reference: its log-probs are taken before the first update.
    """

    stage = STAGE

    def __init__(self, config: DPOConfig, model=None, tokenizer=None, train_rows=None, eval_rows=None,
                 ref_model=None):
        self.cfg = cfg = config
        self.device = common.pick_device(cfg.device)
        common.set_seed(cfg.seed)
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model, padding_side="right")
        self.prepare_data("rm", train_rows, eval_rows)
        model = model if model is not None else load_causal_lm(cfg.model, dtype=cfg.dtype)
        self.model = model.to(self.device)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.pad_id = self.tokenizer.pad_token_id
        self.setup_loop()
        self.ref_logps = self._reference_logps(ref_model)

    def _features(self, rows: list[dict], source: str) -> list[dict]:
        return common.featurize(rows, lambda r: dpo_pair_features(r, self.tokenizer, self.cfg.max_length,
                                                                 chat_template=self.cfg.chat_template),
                                source=source, drop_overlong=self.cfg.drop_overlong)

    def micro_batches(self, features: list[dict]) -> list[dict]:
        return [dpo_batch([features[i] for i in rows], self.pad_id) for rows in self.micro_rows(features)]

    def micro_rows(self, features: list[dict], rows: list[int] | None = None) -> list[list[int]]:
        """``rows`` (default: all) of ``features`` grouped into micro-batches: ``micro_batch_size`` pairs, or
        by ``max_tokens_per_micro_batch`` (both sides of a pair counted; ``common.StepTrainer.group_rows``)."""
        rows = list(range(len(features))) if rows is None else rows
        return self.group_rows(rows, lambda i: len(features[i]["chosen_input_ids"])
                               + len(features[i]["rejected_input_ids"]))

    # ------------------------------------------------------------------------------- the reference
    def _reference_logps(self, ref_model) -> dict[str, torch.Tensor] | None:
        """``{"train": [N, 2], "eval": [M, 2]}`` (chosen, rejected) reference log-prob sums, computed once."""
        if self.cfg.loss_type == "simpo":
            return None
        path = Path(self.cfg.output_dir) / REF_CACHE
        key = json.dumps(self._config_dict(), sort_keys=True)  # a cache of another run is never reused
        if self.cfg.resume and path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("config") == key:
                return {k: cached[k] for k in ("train", "eval")}
        if ref_model is None and self.cfg.ref_model:
            ref_model = load_causal_lm(self.cfg.ref_model, dtype=self.cfg.dtype)
        if ref_model is None and common.latest_checkpoint(Path(self.cfg.output_dir)) is not None:
            # resuming without the cache: the in-memory model is about to be replaced; score the start
            ref_model = load_causal_lm(self.cfg.model, dtype=self.cfg.dtype)
        ref = (ref_model or self.model).to(self.device)
        out = {"train": self._score_all(ref, self.train_features), "eval": self._score_all(ref, self.eval_features)}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**out, "config": key}, path)
        return out

    @torch.no_grad()
    def _score_all(self, model, features: list[dict]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        parts, groups = [], self.micro_rows(features)
        for rows in groups:
            mb = {k: v.to(self.device) for k, v in dpo_batch([features[i] for i in rows], self.pad_id).items()}
            with common.autocast(self.device, self.cfg.bf16):
                lp, _ = sequence_logps(model, mb, backend=self.cfg.kernel_backend, packing=self.cfg.packing)
            parts.append(lp.float().view(2, -1).T.cpu())
        model.train(was_training)
        if not parts:
            return torch.zeros(0, 2)
        order = torch.tensor([i for rows in groups for i in rows])
        out = torch.empty(len(features), 2)
        out[order] = torch.cat(parts)  # micro-batches by tokens need not hold consecutive pairs
        return out

    # ----------------------------------------------------------------------------------- the loss
    def _pair_loss(self, mb: dict, ref: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        with common.autocast(self.device, self.cfg.bf16):
            lp, n_tok = sequence_logps(self.model, mb, backend=self.cfg.kernel_backend, packing=self.cfg.packing)
        m = lp.shape[0] // 2
        ref = ref.to(self.device) if ref is not None else None
        return dpo_loss(lp[:m].float(), lp[m:].float(), None if ref is None else ref[:, 0],
                        None if ref is None else ref[:, 1], beta=self.cfg.beta, loss_type=self.cfg.loss_type,
                        label_smoothing=self.cfg.label_smoothing, chosen_lengths=n_tok[:m],
                        rejected_lengths=n_tok[m:], simpo_gamma=self.cfg.simpo_gamma)

    def _ref_rows(self, split: str, indices: list[int]) -> torch.Tensor | None:
        return None if self.ref_logps is None else self.ref_logps[split][indices]

    def train_step(self, indices: list[int]) -> dict:
        totals: dict[str, torch.Tensor] = {}
        for rows in self.micro_rows(self.train_features, list(indices)):
            mb = dpo_batch([self.train_features[i] for i in rows], self.pad_id)
            loss, stats = self._pair_loss(mb, self._ref_rows("train", rows))
            share = len(rows) / len(indices)  # dpo_loss is a mean over pairs
            (loss * share).backward()
            for k, v in {"loss": loss.detach(), **stats}.items():
                totals[k] = totals.get(k, 0.0) + v * share
        return {**totals, **self.optimizer_step()}

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> dict:
        features = self.eval_features if split == "eval" else self.train_features
        if not features:
            return {}
        was_training = self.model.training
        self.model.eval()
        totals = {}
        for rows in self.micro_rows(features):
            mb = dpo_batch([features[i] for i in rows], self.pad_id)
            loss, stats = self._pair_loss(mb, self._ref_rows(split, rows))
            for k, v in {"loss": loss, **stats}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(rows) / len(features)
        self.model.train(was_training)
        return {f"eval_{k}": v for k, v in totals.items()}

    def final_evaluate(self) -> dict:
        if self.eval_features:
            return self.evaluate()
        print("[fastrlhf] dpo: no eval_data: eval_* metrics are measured on the training pairs (optimistic)")
        return {**self.evaluate("train"), "eval_on_train_pairs": 1.0}

    def save_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def load_model(self, directory: Path) -> None:
        loaded = load_causal_lm(directory, dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(loaded.state_dict())

    def train(self) -> dict:
        return self.run_loop()


def cli_main(config_path: str, overrides: list[str]) -> int:
    """``fastrlhf dpo --config FILE.yaml [key=value ...]`` (checked, locked and pinned as sft / rm are)."""
    from fastrlhf.trainers.guard import stage_cli

    return stage_cli(DPOConfig, DPOTrainer, config_path, overrides)


__all__ = ["DPOConfig", "DPOTrainer", "cli_main", "dpo_batch", "dpo_pair_features", "sequence_logps"]

"""Supervised fine-tuning: next-token loss on response tokens only (stage 1 of RLHF).

Loss of one optimizer step over the sequences of its batch, split into micro-batches for memory:

    L = - sum_{response tokens t of the batch} log p(x_t | x_<t) / (number of response tokens of the batch)

Each micro-batch adds its token sum divided by the batch-wide count, so accumulation over micro-batches of
uneven length gives the same loss and gradients as one big batch (not a mean of per-micro-batch means,
which over-weights short micro-batches). Ouyang et al. 2022 (InstructGPT) §3.5 for the recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrlhf.config import ConfigError
from fastrlhf.data import IGNORE_INDEX, chat_sft_features, pad_batch, sft_features
from fastrlhf.kernels import linear_token_logprobs, token_logprobs
from fastrlhf.models.heads import position_ids_from_mask
from fastrlhf.models.loading import load_causal_lm, load_tokenizer
from fastrlhf.models.packing import block_causal_mask
from fastrlhf.models.policy import effective_temperature
from fastrlhf.trainers import common

STAGE = "sft"


@dataclass(frozen=True)
class SFTConfig(common.StageConfig):
    """Every SFT setting, with its default. ``model``, ``data`` and ``output_dir`` are required.

    ``batch_size`` sequences per optimizer step, processed ``micro_batch_size`` at a time (or, with
    ``max_tokens_per_micro_batch``, as many as fit that many tokens: a balanced bin-packing of lengths).
    ``eval_every`` / ``save_every``: in optimizer steps, 0 = only at the end. ``max_steps`` > 0 caps
    the run (smoke tests). ``precision`` (auto | bf16 | fp32): bf16 compute with fp32 master weights and
    AdamW state (``fastrlhf.engine.precision``). Under ``torchrun`` the model is FSDP2-sharded, each rank
    trains on its share of every global batch of ``batch_size`` sequences and rank 0 writes the files.
    ``loss_impl="fused"`` computes log-probs from hidden states and
    the LM head chunk by chunk (``linear_token_logprobs``: no ``[B, T, V]`` logits); ``"logits"`` uses
    the model's logits. ``kernel_backend``: "auto" | "triton" | "torch" for that op.
    """

    packing: bool = False
    loss_impl: str = "fused"
    kernel_backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.loss_impl not in ("fused", "logits"):
            raise ConfigError(f"SFTConfig: loss_impl must be 'fused' or 'logits', got {self.loss_impl!r}")
        if self.kernel_backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"SFTConfig: kernel_backend must be auto|triton|torch, "
                              f"got {self.kernel_backend!r}")


# ------------------------------------------------------------------------------------------------ loss
def response_nll_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, loss_impl: str = "fused",
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of -log p over response tokens, number of response tokens)`` of one padded batch.

    ``batch``: ``input_ids``, ``labels`` (-100 off the response), ``attention_mask`` ``[B, T]``, and
    optional ``position_ids`` / 4-D ``attention_mask`` for packed rows. Token ``t`` is predicted at
    position ``t - 1``. ``backend`` goes to the ``fastrlhf.kernels`` log-prob op. The sum is fp32 and
    differentiable; the count is an int64 0-dim tensor.
    """
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = position_ids_from_mask(batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=position_ids, use_cache=False)
    if loss_impl == "fused":
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1]
        head = model.get_output_embeddings()
        weight = head.weight.to(hidden.dtype)
        bias = head.bias.to(hidden.dtype) if getattr(head, "bias", None) is not None else None
        # the model's own logit scaling (Cohere, Granite) as a temperature; soft-capping is refused
        lp = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX,
                                   temperature=effective_temperature(model.config, 1.0), backend=backend)
    else:
        logits = model(**inputs).logits[:, :-1]
        lp = token_logprobs(logits, labels, ignore_index=IGNORE_INDEX, backend=backend)
    return -lp.sum(), (labels != IGNORE_INDEX).sum()


def _nll(model, batch, **kwargs):
    """``response_nll_sum`` through the model's own registered forward method when it has one (FSDP2:
    the root's embeddings and LM head are unsharded only inside a forward of the root)."""
    method = getattr(model, "response_nll_sum", None)
    return method(batch, **kwargs) if method is not None else response_nll_sum(model, batch, **kwargs)


def register_nll_forward(model: torch.nn.Module) -> None:
    """Make ``response_nll_sum`` a forward method of an FSDP2 root (all-gather before, reshard after)."""
    import types

    from torch.distributed.fsdp import register_fsdp_forward_method
    model.response_nll_sum = types.MethodType(response_nll_sum, model)
    register_fsdp_forward_method(model, "response_nll_sum")


def accumulate_sft_gradients(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], *,
                             device: torch.device, bf16: bool = False, loss_impl: str = "fused",
                             backend: str = "auto", total: int | None = None,
                             grad_scale: float = 1.0) -> tuple[torch.Tensor, int]:
    """Forward + backward over ``micro_batches``; gradients of ``sum NLL / total response tokens``.

    Returns ``(loss, total_tokens)``: the batch loss as a detached fp32 0-dim tensor and the token count
    (one host sync per step, before any forward, to get the normaliser). Data parallel: ``total`` is
    the global token count (all ranks), ``grad_scale`` the world size (FSDP2 averages gradients over
    ranks), and the returned loss this rank's share (their sum over ranks is the batch loss). A
    micro-batch with the key ``dummy`` runs forward and backward with weight 0 (collectives stay even).
    """
    if total is None:
        total = int(sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches
                        if "dummy" not in mb))
    if total == 0:
        raise ValueError("an SFT batch has no response tokens (every label is -100)")
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for mb in micro_batches:
        weight = 0.0 if "dummy" in mb else 1.0
        mb = {k: v.to(device) for k, v in mb.items() if k != "dummy"}
        with common.autocast(device, bf16):
            nll, _ = _nll(model, mb, loss_impl=loss_impl, backend=backend)
        (nll * (weight * grad_scale / total)).backward()
        loss += weight * nll.detach().double() / total
    return loss.float(), total


@torch.no_grad()
def evaluate_sft(model: torch.nn.Module, micro_batches, *, device: torch.device, bf16: bool = False,
                 loss_impl: str = "fused", backend: str = "auto") -> dict[str, float]:
    """Token-level mean NLL over all response tokens of ``micro_batches`` and its perplexity."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for mb in micro_batches:
        mb = {k: v.to(device) for k, v in mb.items()}
        with common.autocast(device, bf16):
            s, n = _nll(model, mb, loss_impl=loss_impl, backend=backend)
        nll += s.double()
        count += int(n)
    model.train(was_training)
    loss = float(nll) / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


# ------------------------------------------------------------------------------------- features, batches
def sft_row_features(row: dict, tokenizer, max_length: int, *, chat_template: bool = False) -> dict:
    """One sft row (``{"prompt", "response"}`` or ``{"messages"}``) -> token features with labels.

    ``messages`` rows always go through the tokenizer's chat template; a prompt/response row's prompt
    does when ``chat_template`` (see :func:`fastrlhf.trainers.common.format_prompt`).
    A row longer than ``max_length`` is never cut (a cut response teaches a wrong ending): it raises
    ``ValueError`` naming ``max_length``, which the trainer turns into a drop with a count or an error
    (``drop_overlong``).
    """
    if row.get("messages") is not None:
        f = chat_sft_features(row["messages"], tokenizer)
    else:
        prompt = common.format_prompt(tokenizer, row["prompt"], chat_template=chat_template)
        f = sft_features(prompt, row["response"], tokenizer)
    if max_length is not None and len(f["input_ids"]) > max_length:
        raise ValueError(f"the row has {len(f['input_ids'])} tokens, more than max_length={max_length}")
    return f


def pack_features(features: list[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing packing of examples into rows of at most ``max_length`` tokens.

    Each packed row keeps ``segment_ids`` (0, 1, ... per example) and per-example ``position_ids``;
    the first label of every example is set to -100 so nothing is predicted across a boundary
    (it is a prompt or template token in every feature builder anyway).
    """
    rows: list[dict] = []
    for f in sorted(features, key=lambda f: -len(f["input_ids"])):  # longest first: tighter bins
        n = len(f["input_ids"])
        target = next((r for r in rows if len(r["input_ids"]) + n <= max_length), None)
        if target is None:
            target = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
            rows.append(target)
        seg = target["segment_ids"][-1] + 1 if target["segment_ids"] else 0
        target["input_ids"] += f["input_ids"]
        target["labels"] += [IGNORE_INDEX] + list(f["labels"][1:])
        target["position_ids"] += list(range(n))
        target["segment_ids"] += [seg] * n
    return rows


def packed_attention_mask(segment_ids: torch.Tensor, attn_implementation: str,
                          dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, T, T]`` block-diagonal causal mask from ``segment_ids [B, T]`` (-1 = padding): the one
    :func:`fastrlhf.models.packing.block_causal_mask` that PPO's packed micro-batches use too."""
    return block_causal_mask(segment_ids, attn_implementation, dtype)


def collate(features: list[dict], pad_id: int, model_config=None, dtype=torch.float32) -> dict:
    """Right-padded ``[B, T]`` tensors; packed rows also get ``position_ids`` and a 4-D mask."""
    if "segment_ids" not in features[0]:
        return pad_batch([{k: f[k] for k in ("input_ids", "labels", "attention_mask")} for f in features],
                         pad_id, padding_side="right")
    t = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), t), pad_id),
             "labels": torch.full((len(features), t), IGNORE_INDEX),
             "position_ids": torch.zeros(len(features), t, dtype=torch.long),
             "segment_ids": torch.full((len(features), t), -1)}
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        for key in ("input_ids", "labels", "position_ids", "segment_ids"):
            batch[key][i, :n] = torch.tensor(f[key])
    impl = getattr(model_config, "_attn_implementation", None) or "sdpa"
    batch["attention_mask"] = packed_attention_mask(batch.pop("segment_ids"), impl, dtype)
    return batch


# ----------------------------------------------------------------------------------------------- trainer
class SFTTrainer(common.StepTrainer):
    """``SFTTrainer(config).train()``: fine-tune ``config.model`` on ``config.data`` and save a checkpoint
    that ``AutoModelForCausalLM.from_pretrained(output_dir / "final")`` loads (tokenizer included).

    ``model``, ``tokenizer``, ``train_rows`` and ``eval_rows`` may be passed in (the demo does) instead of
    being loaded from the config's paths. Rows are validated and tokenized here, before any training.
    """

    stage = STAGE

    def __init__(self, config: SFTConfig, model=None, tokenizer=None, train_rows=None, eval_rows=None,
                 runtime=None):
        self.cfg = cfg = config
        self.setup_runtime(runtime)
        common.set_seed(cfg.seed)
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model, padding_side="right")
        self.prepare_data("sft", train_rows, eval_rows)
        if model is None:  # fp32 masters; under torchrun rank 0 reads, the others receive shards
            from fastrlhf.engine.loading import causal_lm_source
            model = (self.load_sharded(common.lora_source(cfg, causal_lm_source(cfg.model)))
                     or load_causal_lm(cfg.model))
        self.model = self.place_model(common.maybe_apply_lora(cfg, model))
        if self.fsdp:
            register_nll_forward(self.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.setup_loop()

    def _features(self, rows: list[dict], source: str) -> list[dict]:
        feats = common.featurize(rows, lambda r: sft_row_features(r, self.tokenizer, self.cfg.max_length,
                                                                     chat_template=self.cfg.chat_template),
                                 source=source, drop_overlong=self.cfg.drop_overlong)
        return pack_features(feats, self.cfg.max_length) if self.cfg.packing else feats

    def micro_batches(self, features: list[dict]) -> list[dict]:
        dtype = next(self.model.parameters()).dtype
        return [collate(group, self.pad_id, self.model.config, dtype)
                for group in self.group_rows(features, lambda f: len(f["input_ids"]))]

    def train_step(self, indices: list[int]) -> dict:
        """One optimizer step on the global batch ``indices``: this rank's rows, the loss normalized by
        the response tokens of all ranks."""
        rows, real = self.local_rows(indices)
        batch = self.even_micro_batches(self.micro_batches([self.train_features[i] for i in rows]), real)
        total = None
        if self.world_size > 1:
            local = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in batch if "dummy" not in mb)
            total = int(self.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64)))
        loss, tokens = accumulate_sft_gradients(self.model, batch, device=self.device,
                                                bf16=self.autocast_bf16, loss_impl=self.cfg.loss_impl, backend=self.cfg.kernel_backend,
                                                total=total, grad_scale=float(self.world_size))
        return {"loss": self.all_reduce_sum(loss), "tokens": tokens, **self.optimizer_step()}

    def evaluate(self) -> dict:
        # every rank evaluates every row (FSDP2 needs all ranks in each forward); the same numbers everywhere
        if not self.eval_features:
            return {}
        return evaluate_sft(self.model, self.micro_batches(self.eval_features), device=self.device,
                            bf16=self.autocast_bf16, loss_impl=self.cfg.loss_impl, backend=self.cfg.kernel_backend)

    def save_model(self, directory: Path) -> None:
        if self.fsdp:  # collective, streamed a bucket of layers at a time (LoRA: merged); rank 0 writes
            from fastrlhf.engine.checkpoint import export_hf
            export_hf(self.model, directory, tokenizer=self.tokenizer)
            if self.cfg.lora_rank:
                common.save_adapters(self.model, directory)
            return
        if self.cfg.lora_rank:  # a plain HF checkpoint (adapters merged) + the adapters for resume
            from fastrlhf.models.lora import save_merged_pretrained
            save_merged_pretrained(self.model, directory, tokenizer=self.tokenizer)
            common.save_adapters(self.model, directory)
            return
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def load_model(self, directory: Path) -> None:
        if self.cfg.lora_rank:
            common.load_adapters(self.model, directory)
            return
        loaded = load_causal_lm(directory, dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(loaded.state_dict())

    def train(self) -> dict:
        """Train (or resume, or return the recorded result of a finished run); returns the final eval
        metrics (``eval_loss``, ``eval_ppl``, ``eval_tokens`` when there is eval data) and ``train_loss``."""
        return self.run_loop()


def cli_main(config_path: str, overrides: list[str]) -> int:
    """``fastrlhf sft --config FILE.yaml [key=value ...]``."""
    from fastrlhf.trainers.guard import stage_cli

    return stage_cli(SFTConfig, SFTTrainer, config_path, overrides)


__all__ = ["SFTConfig", "SFTTrainer", "accumulate_sft_gradients", "cli_main", "evaluate_sft", "pack_features",
           "response_nll_sum"]

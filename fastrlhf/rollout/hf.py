"""HF rollout backend: batched sampling with a KV cache, driven by the actor's own forward.

The actor generates with its own (training) weights, so there is nothing to sync
(``shares_actor_weights = True``) and sleep / wake are no-ops. The loop always runs exactly
``max_new_tokens`` forward calls (one prefill + ``max_new_tokens - 1`` decode steps) whatever the
EOS pattern: under FSDP2 every forward is a collective, so ranks must take the same number of steps.
Responses are cut after their first EOS afterwards.

The model is called as an HF causal LM: ``model(input_ids=, attention_mask=, position_ids=,
past_key_values=, use_cache=True, logits_to_keep=1)`` returning ``.logits`` and ``.past_key_values``.
``fastrlhf.models.policy.PolicyWithLoss`` forwards that call to its LM inside its own forward, so a
wrapped (FSDP2-sharded) actor works unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from fastrlhf.rollout.base import Generation, SamplingParams


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. ``logits [B, V]`` fp32.

    top-p keeps the smallest prefix of tokens (by descending probability) whose mass reaches ``top_p``
    (Holtzman et al., 2020); the most likely token is always kept.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # mass strictly before each token; a token is dropped once the mass before it reaches top_p
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def left_pad(prompt_ids: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> ``(input_ids [B, P] int64, attention_mask [B, P] int64)``, padded on the left."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (got an empty prompt or an empty batch)")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Inside: every FSDP2 unit of ``model`` unsharded (one all-gather each) and kept so across forwards
    (``reshard_after_forward`` off); on exit resharded and the setting restored. A plain module: nothing.
    A collective under FSDP2: every rank enters and leaves together."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()  # noqa: N806
    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
    if not units:
        yield
        return
    saved = [_reshard_state(u) for u in units]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for u, state in zip(units, saved, strict=True):
            u.reshard()
            _restore_reshard_state(u, state)


def _reshard_state(unit):
    """What ``set_reshard_after_forward`` overwrites (FSDP2 internals: per param group the post-forward
    mesh, and the root's automatic choice), to put back exactly; None where this torch lays it out
    differently (then the public default, reshard after forward, is restored)."""
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older torch: one group per state
        one = getattr(state, "_fsdp_param_group", None)
        groups = [one] if one is not None else []
    if not all(hasattr(g, "post_forward_mesh_info") for g in groups):
        return None
    auto = getattr(state, "_auto_reshard_after_forward", None)
    return auto, [(g, g.post_forward_mesh_info) for g in groups]


def _restore_reshard_state(unit, saved) -> None:
    if saved is None:
        unit.set_reshard_after_forward(True, recurse=False)
        return
    auto, groups = saved
    for group, info in groups:
        group.post_forward_mesh_info = info
    if auto is not None:
        unit._get_fsdp_state()._auto_reshard_after_forward = auto


class HFRollout:
    """``RolloutEngine`` over an HF-style causal LM (see module docstring).

    Log-probs returned are those of the sampled tokens under the distribution they were drawn from:
    ``softmax(logits / temperature)`` after top-k / top-p truncation, renormalised (as vLLM's
    ``processed_logprobs``; see :class:`SamplingParams`). Without truncation that is the quantity the
    trainer recomputes, so the logged mismatch measures numerics only. ``temperature == 0`` samples
    greedily and reports log-probs at temperature 1. ``params.n > 1`` repeats each prompt ``n`` times
    (adjacent rows) in one batch with one generator: the samples of a prompt are independent draws.

    Under FSDP2 (several ranks) every FSDP unit of the model is all-gathered once at the start of
    :meth:`generate` and kept unsharded until the end (instead of one all-gather per layer per decode
    step): the rank holds the full actor while it generates, as a vLLM engine would.
    """

    shares_actor_weights = True

    def __init__(self, model, *, pad_token_id: int, eos_token_id: int | list[int]):
        if pad_token_id is None:
            raise ValueError("HFRollout needs a pad_token_id (the tokenizer has no pad token)")
        self.model = model
        self.pad_token_id = int(pad_token_id)
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        if any(e is None for e in eos):
            raise ValueError("HFRollout needs an eos_token_id")
        self.eos_token_ids = [int(e) for e in eos]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generator(self, seed: int | None) -> torch.Generator:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator(device=self.device).manual_seed(seed)

    def _sample(self, logits: torch.Tensor, params: SamplingParams, gen: torch.Generator):
        """``logits [B, V]`` -> ``(tokens [B] int64, logprobs [B] fp32)``."""
        logits = logits.float()
        if params.temperature == 0:
            tokens = logits.argmax(-1)
            return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
        scaled = filter_logits(logits / params.temperature, top_k=params.top_k, top_p=params.top_p)
        logp = scaled.log_softmax(-1)  # of the truncated, renormalised distribution
        tokens = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        """``params.n`` responses per prompt (prompt-major); exactly ``params.max_new_tokens`` forward
        calls."""
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if params.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {params.temperature}")
        if params.n < 1:
            raise ValueError(f"n must be >= 1, got {params.n}")
        rows = [p for p in prompt_ids for _ in range(params.n)]
        ids, mask = left_pad(rows, self.pad_token_id, self.device)
        gen = self._generator(params.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with gathered(self.model):
                tokens, logprobs = self._loop(ids, mask, params, gen)
        finally:
            self.model.train(was_training)
        return self._cut(tokens.cpu(), logprobs.cpu())

    def _loop(self, ids, mask, params, gen):
        from transformers import DynamicCache

        cache = DynamicCache()
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, out_tokens, out_lp = ids, [], []
        for _step in range(params.max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            tok, lp = self._sample(out.logits[:, -1, :], params, gen)
            out_tokens.append(tok)
            out_lp.append(lp)
            # Rows that already emitted EOS keep decoding (lockstep); their extra tokens are cut later.
            step_ids = tok[:, None]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            position = position[:, -1:] + 1
        return torch.stack(out_tokens, 1), torch.stack(out_lp, 1)

    def _cut(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> Generation:
        """Cut each row after its first EOS (kept); rows without EOS keep all tokens."""
        is_eos = torch.zeros_like(tokens, dtype=torch.bool)
        for e in self.eos_token_ids:
            is_eos |= tokens == e
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, tokens.shape[1]).tolist()
        return Generation(
            token_ids=[t[:n].tolist() for t, n in zip(tokens, lengths, strict=True)],
            logprobs=[lp[:n].tolist() for lp, n in zip(logprobs, lengths, strict=True)],
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The actor's parameters are the generator's: nothing to load."""
        for _ in named_tensors:
            pass

    def sleep(self, level: int = 1) -> None:
        """No separate engine state to release."""

    def wake(self) -> None:
        """No separate engine state to bring back."""

"""The tensors of one PPO iteration and how they are cut into minibatches and micro-batches.

Layout (see ``fastrlhf.models.policy``): ``input_ids [B, P + R]`` = prompts left-padded to ``P``,
then responses right-padded to ``R``; every per-token tensor is ``[B, R]`` over the response part,
with ``mask [B, R]`` marking real response tokens (EOS included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastrlhf.rollout.base import Generation


@dataclass
class PPOBatch:
    input_ids: torch.Tensor  # [B, P+R] int64
    attention_mask: torch.Tensor  # [B, P+R] int64
    mask: torch.Tensor  # [B, R] bool, valid response tokens
    prompt_len: int  # P
    sampler_logprobs: torch.Tensor  # [B, R] fp32, from the rollout engine (0 at padding)
    old_logprobs: torch.Tensor | None = None  # [B, R] fp32, actor under training numerics
    ref_logprobs: torch.Tensor | None = None  # [B, R]
    old_values: torch.Tensor | None = None  # [B, R]
    advantages: torch.Tensor | None = None  # [B, R]
    returns: torch.Tensor | None = None  # [B, R]
    # rollout.n samples per prompt: rows of a prompt are adjacent, group[b] = index of row b's prompt in
    # this rank's batch (0..rollout_batch_size-1), so group = arange(B) // n
    group: torch.Tensor | None = None  # [B] int64
    truncated: torch.Tensor | None = None  # [B] bool, response ends without EOS (cut at max_new_tokens)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def select(self, rows: torch.Tensor) -> PPOBatch:
        """The rows ``rows`` (int64 [n]) of every tensor; widths (P, R) are kept."""
        picked = {
            f.name: (v.index_select(0, rows) if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return PPOBatch(**picked)


def build_batch(
    prompt_ids: list[list[int]], gen: Generation, *, pad_token_id: int, device: torch.device,
    eos_token_ids: list[int] | None = None,
) -> PPOBatch:
    """Ragged prompts + generations -> a padded :class:`PPOBatch` on ``device``.

    ``gen`` may hold ``n`` responses per prompt (prompt-major, ``len(gen) == n * len(prompt_ids)``):
    each prompt is then repeated for its ``n`` adjacent rows and ``group`` = ``arange(B) // n``.
    With ``eos_token_ids``, ``truncated`` marks rows whose response does not end with one of them."""
    if not prompt_ids or len(gen.token_ids) % len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(gen.token_ids)} responses")
    n = len(gen.token_ids) // len(prompt_ids)
    group = torch.arange(len(prompt_ids)).repeat_interleave(n)
    prompt_ids = [p for p in prompt_ids for _ in range(n)]
    bsz = len(prompt_ids)
    p_len = max(len(p) for p in prompt_ids)
    r_len = max(1, max(len(r) for r in gen.token_ids))
    ids = torch.full((bsz, p_len + r_len), pad_token_id, dtype=torch.long)
    attn = torch.zeros((bsz, p_len + r_len), dtype=torch.long)
    lps = torch.zeros((bsz, r_len), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompt_ids, gen.token_ids, gen.logprobs, strict=True)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        ids[i, p_len : p_len + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, p_len - len(p) : p_len + len(r)] = 1
        lps[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    mask = attn[:, p_len:].bool()
    truncated = None
    if eos_token_ids is not None:
        eos = set(int(e) for e in eos_token_ids)
        truncated = torch.tensor([not r or r[-1] not in eos for r in gen.token_ids], dtype=torch.bool)
    return PPOBatch(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        mask=mask.to(device),
        prompt_len=p_len,
        sampler_logprobs=lps.to(device),
        group=group.to(device),
        truncated=None if truncated is None else truncated.to(device),
    )


def loss_weight(mask: torch.Tensor, total: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Share of a micro-batch in its minibatch's loss, so that sum_k w_k * loss_k == loss(minibatch).

    ``loss_agg="token-mean"`` averages over tokens: weight = valid tokens of the micro-batch / valid
    tokens of the minibatch. The ``seq-mean-*`` modes average over rows that have a valid token:
    weight = such rows in the micro-batch / such rows in the minibatch. ``total`` is that minibatch
    count (0-dim). A micro-batch with nothing valid gets weight 0.
    """
    # total may be a mean over ranks (fractional); nothing valid anywhere gives 0 / tiny = 0
    return count_units(mask, loss_agg).float() / total.float().clamp(min=1e-12)


def count_units(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Valid tokens (token-mean) or rows with a valid token (seq-mean-*) in ``mask [B, R]``."""
    if loss_agg == "token-mean":
        return mask.sum()
    return mask.any(-1).sum()


def split_rows(rows: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """Consecutive chunks of ``rows`` of at most ``size`` (None: one chunk)."""
    if size is None or size >= rows.numel():
        return [rows]
    return list(torch.split(rows, size))

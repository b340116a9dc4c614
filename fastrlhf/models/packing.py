"""Packed micro-batches: the valid tokens of padded rows, concatenated, with attention confined to each row.

A padded batch ``input_ids [B, T]`` with ``attention_mask [B, T]`` (left, right or both-side padding)
holds ``n = attention_mask.sum()`` real tokens. Packing lays those tokens out as ``[M, L]`` (``M`` packed
rows of at most ``L`` tokens, every original row whole inside one packed row), with

- ``position_ids`` restarting at 0 at each original row: ``0..len-1``, exactly what
  ``position_ids_from_mask`` gives the padded row, so RoPE and learned absolute positions (GPT-2) see the
  same numbers;
- attention confined to each original row and causal inside it: a block-diagonal causal mask
  (``block_causal_mask``) for the ``sdpa`` / ``eager`` attention of transformers (CPU and GPU), or, for
  ``flash_attention_*`` / ``flex_attention``, no mask at all: transformers derives the varlen segments
  (``cu_seqlens``) from the restarting ``position_ids`` (use ``L = None``: one packed row, ``M = 1``).

Every per-token result of the packed forward maps back to ``[B, T]`` through ``index`` (the flat packed
position of every valid ``(b, t)``), so the padded layout of the trainers stays the interface; only the
forward passes stop paying for padding. ``balanced_micro_batches`` groups rows into micro-batches of at
most ``max_tokens`` valid tokens each (a balanced bin-packing, veRL's ``use_dynamic_bsz`` idea).

Next-token quantities: the hidden state predicting the token at packed position ``k`` sits at ``k - 1``
(same row whenever the token is not its row's first), so ``index - 1`` addresses them without a shift
of the packed tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FLASH_LIKE = ("flash_attention_2", "flash_attention_3", "flex_attention", "kernels-community")


# --------------------------------------------------------------------------------------- bin-packing
def balanced_micro_batches(lengths, max_tokens: int, *, min_bins: int = 1) -> list[list[int]]:
    """Group row indices into as few micro-batches as first-fit-decreasing needs (at least ``min_bins``),
    each holding at most ``max_tokens`` tokens, then balance them: rows longest first, each into the
    least-loaded micro-batch that still has room (LPT). Rows keep ascending order inside a micro-batch;
    micro-batches come out in order of their first row. Raises ValueError for a row over ``max_tokens``.

    ``min_bins`` lets data-parallel ranks agree on one count (the all-reduced max): FSDP needs every rank
    to run the same number of forwards. Bins may come out empty only when there are fewer rows than it.
    """
    lengths = [int(x) for x in lengths]
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got {max_tokens}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"row {i} has {n} tokens, more than max_tokens_per_micro_batch={max_tokens}; "
                         f"raise max_tokens_per_micro_batch to at least {max(n for _, n in too_long)}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    ffd: list[int] = []  # loads of the first-fit-decreasing bins: how many bins are needed
    for i in order:
        slot = next((b for b, load in enumerate(ffd) if load + lengths[i] <= max_tokens), None)
        if slot is None:
            ffd.append(lengths[i])
        else:
            ffd[slot] += lengths[i]
    k = max(len(ffd), min_bins, 1)
    while True:
        loads, bins = [0] * k, [[] for _ in range(k)]
        for i in order:
            fits = [b for b in range(k) if loads[b] + lengths[i] <= max_tokens]
            if not fits:
                break
            b = min(fits, key=lambda b: (loads[b], b))
            loads[b] += lengths[i]
            bins[b].append(i)
        else:
            out = [sorted(b) for b in bins]
            return sorted(out, key=lambda b: (not b, b[0] if b else 0))
        k += 1  # LPT can need one more bin than FFD; k = len(rows) always succeeds


def first_fit_rows(lengths, capacity: int | None) -> list[list[int]]:
    """Rows (indices into ``lengths``) for each packed row of at most ``capacity`` tokens, first-fit
    decreasing; ``capacity=None``: everything in one packed row."""
    if capacity is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"row {i} has {n} tokens, more than the packed row capacity {capacity}")
        slot = next((r for r, load in enumerate(loads) if load + n <= capacity), None)
        if slot is None:
            rows.append([i])
            loads.append(n)
        else:
            rows[slot].append(i)
            loads[slot] += n
    return rows


# ------------------------------------------------------------------------------------------- layout
@dataclass
class PackedRows:
    """The valid tokens of ``B`` padded rows of width ``T`` laid out as ``[M, L]``.

    ``input_ids``, ``position_ids``, ``segment_ids`` (0, 1, ... per original row in a packed row; -1 at
    the packed row's tail padding) are ``[M, L]`` int64. ``index [B, T]`` int64: flat packed position
    (into ``M * L``) of every valid ``(b, t)``, -1 elsewhere. ``last [B]``: flat packed position of
    each row's last valid token (-1 for a row with none).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    index: torch.Tensor
    last: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def unpack(self, packed: torch.Tensor, *, fill: float = 0.0, shift: int = 0) -> torch.Tensor:
        """``packed [M, L, ...]`` -> ``[B, T, ...]``: the value at each valid ``(b, t)`` (read at packed
        position ``index + shift``; ``shift=-1`` gives the hidden state that predicts token ``t``), ``fill``
        elsewhere. Differentiable w.r.t. ``packed``."""
        flat = packed.reshape(-1, *packed.shape[2:])
        valid = self.index >= 0
        src = (self.index + shift).clamp(min=0)
        out = flat[src.reshape(-1)].reshape(*self.index.shape, *packed.shape[2:])
        keep = valid.reshape(*valid.shape, *([1] * (packed.dim() - 2)))
        return torch.where(keep, out, torch.full_like(out, fill))

    def gather(self, packed: torch.Tensor, where: torch.Tensor, *, shift: int = 0) -> torch.Tensor:
        """``packed [M, L, ...]`` at the valid positions selected by ``where [B, T]`` (bool), in row-major
        order of ``(b, t)``: ``[n, ...]``. The compact form for losses that only need the selected tokens."""
        flat = packed.reshape(-1, *packed.shape[2:])
        idx = self.index[where.bool() & (self.index >= 0)] + shift
        return flat[idx]

    def last_token(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed [M, L, ...]`` at each row's last valid token: ``[B, ...]`` (0 for rows with none)."""
        flat = packed.reshape(-1, *packed.shape[2:])
        out = flat[self.last.clamp(min=0)]
        keep = (self.last >= 0).reshape(-1, *([1] * (packed.dim() - 2)))
        return torch.where(keep, out, torch.zeros_like(out))


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, row_capacity: int | None = None,
              pad_id: int = 0) -> PackedRows:
    """Pack the valid tokens (``attention_mask`` 1) of each row of ``input_ids [B, T]``.

    A row's valid tokens must be contiguous (left and/or right padding, as every fastrlhf batch is);
    ``row_capacity``: tokens per packed row (None: one packed row holding everything, the layout for
    flash-attention varlen). Rows with no valid token take no space.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must be the same [B, T]")
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    first = torch.where(lengths > 0, mask.int().argmax(-1), torch.zeros_like(lengths))
    span = mask.int().flip(-1).argmax(-1)  # pads after the last valid token
    if bool(((input_ids.shape[1] - first - span) != lengths)[lengths > 0].any()):
        raise ValueError("pack_rows needs each row's valid tokens to be contiguous (left/right padding)")
    lens = lengths.tolist()  # one host sync per packing
    groups = first_fit_rows(lens, row_capacity)
    width = row_capacity if row_capacity is not None else max(1, sum(lens))
    width = min(width, max([sum(lens[i] for i in g) for g in groups] + [1]))  # no all-padding tail columns
    m, device = len(groups), input_ids.device
    b, t = input_ids.shape
    out_ids = torch.full((m, width), pad_id, dtype=input_ids.dtype, device=device)
    pos = torch.zeros((m, width), dtype=torch.long, device=device)
    seg = torch.full((m, width), -1, dtype=torch.long, device=device)
    index = torch.full((b, t), -1, dtype=torch.long, device=device)
    last = torch.full((b,), -1, dtype=torch.long, device=device)
    starts = first.tolist()
    for r, group in enumerate(groups):
        col, s = 0, 0
        for i in sorted(group):
            n = lens[i]
            if n == 0:
                continue
            lo = starts[i]
            out_ids[r, col:col + n] = input_ids[i, lo:lo + n]
            pos[r, col:col + n] = torch.arange(n, device=device)
            seg[r, col:col + n] = s
            index[i, lo:lo + n] = torch.arange(r * width + col, r * width + col + n, device=device)
            last[i] = r * width + col + n - 1
            col, s = col + n, s + 1
        if col < width:  # tail padding: positions 0.. of its own segment, attends to itself only
            pos[r, col:] = torch.arange(width - col, device=device)
    return PackedRows(out_ids, pos, seg, index, last)


def block_causal_mask(segment_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """``[M, 1, L, L]`` block-diagonal causal mask from ``segment_ids [M, L]`` (-1 = padding).

    Token i attends to j iff same segment and j <= i; a padding token attends to itself only (a fully
    masked query row would give NaN in SDPA). bool (True = attend) for "sdpa", additive float for "eager".
    """
    t = segment_ids.shape[1]
    pos = torch.arange(t, device=segment_ids.device)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
    allowed = (same & (pos[None, None, :] <= pos[None, :, None])) | torch.eye(t, dtype=torch.bool,
                                                                           device=segment_ids.device)
    if attn_implementation == "sdpa":
        return allowed[:, None]
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    raise ValueError(f"packing needs attn_implementation 'sdpa', 'eager' or a flash/flex attention, the "
                     f"model uses {attn_implementation!r}; set packing=false")


def attn_implementation(config) -> str:
    return getattr(config, "_attn_implementation", None) or "sdpa"


def uses_varlen(config) -> bool:
    """True when the model's attention takes packed rows from ``position_ids`` alone (flash / flex)."""
    return attn_implementation(config).startswith(FLASH_LIKE)


def default_row_capacity(config, attention_mask: torch.Tensor) -> int | None:
    """Packed row width: None (one row, varlen attention) for flash/flex attention; else the longest row
    of the batch, so the dense block mask costs no more attention than the padded batch did."""
    if uses_varlen(config):
        return None
    return max(1, int(attention_mask.sum(-1).max()))


def body_inputs(packed: PackedRows, config, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments for an HF transformer body (``LlamaModel``, ``GPT2Model``, ...) on packed rows."""
    kwargs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
    impl = attn_implementation(config)
    if uses_varlen(config):
        if packed.input_ids.shape[0] != 1:
            raise ValueError(f"{impl} takes packed rows as one row (row_capacity=None), got "
                             f"{packed.input_ids.shape[0]}")
        kwargs["attention_mask"] = None  # transformers derives the varlen segments from position_ids
    else:
        kwargs["attention_mask"] = block_causal_mask(packed.segment_ids, impl, dtype)
    return kwargs


def pack_for(model_config, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             pad_id: int = 0) -> PackedRows:
    """:func:`pack_rows` with the row capacity the model's attention wants."""
    return pack_rows(input_ids, attention_mask, row_capacity=default_row_capacity(model_config, attention_mask),
                     pad_id=pad_id)


# ------------------------------------------------------------------------------ packed model forwards
def packed_hidden(body, packed: PackedRows) -> torch.Tensor:
    """``[M, L, H]`` last hidden states of an HF transformer ``body`` on packed rows."""
    dtype = next(body.parameters()).dtype
    return body(**body_inputs(packed, body.config, dtype)).last_hidden_state


def head_outputs_packed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``ScalarHeadModel.head_outputs`` (``[B, T, K]`` fp32, 0 at padding) through a packed forward."""
    packed = pack_for(model.config, input_ids, attention_mask)
    h = packed_hidden(model.body, packed)
    return packed.unpack(model.head(h.to(model.head.weight.dtype)).float())


def last_token_outputs_packed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``ScalarHeadModel.last_token_outputs`` (``[B, K]`` fp32) through a packed forward: only each
    row's last token goes through the head."""
    packed = pack_for(model.config, input_ids, attention_mask)
    h = packed.last_token(packed_hidden(model.body, packed))
    return model.head(h.to(model.head.weight.dtype)).float()


def policy_forward_packed(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mode: str,
                          prompt_len: int, **loss_kwargs):
    """``PolicyWithLoss.forward`` in modes "logprobs" / "loss" on packed rows; same outputs and layout
    (``[B, R]``) as the padded forward. Only the hidden states that predict a response token reach the
    LM head: the head's GEMMs skip prompts and padding. ``loss_agg="token-mean"`` runs the fused loss on
    the compacted tokens ``[1, n]``; the ``seq-mean-*`` modes need rows and scatter them back to
    ``[B, R, H]`` (still without padded attention)."""
    from fastrlhf.kernels import fused_ppo_loss, linear_token_logprobs

    packed = pack_for(policy.config, input_ids, attention_mask)
    hidden = packed_hidden(policy.lm.get_decoder(), packed)
    resp_mask = attention_mask[:, prompt_len:].bool()
    if mode == "loss":
        resp_mask = resp_mask & loss_kwargs["mask"].bool()
    where = torch.zeros_like(attention_mask, dtype=torch.bool)
    where[:, prompt_len:] = resp_mask
    labels = input_ids[:, prompt_len:]
    weight, bias = policy._head()
    kw = dict(temperature=policy.temperature, chunk_size=policy.chunk_size, backend=policy.backend)
    if mode == "logprobs":
        sel = packed.gather(hidden, where, shift=-1)  # [n, H]: the states that predict response tokens
        lp, ent = linear_token_logprobs(sel[None], weight, labels[resp_mask][None], bias=bias,
                                        return_entropy=True, **kw)
        values = policy._values(sel[None])
        return (_scatter(lp[0], resp_mask), _scatter(ent[0], resp_mask),
                None if values is None else _scatter(values[0], resp_mask))
    if mode != "loss":
        raise ValueError(f"packed forward supports modes 'logprobs' and 'loss', got {mode!r}")
    # the variant named by policy_loss (fastrlhf.algo registry); sequence-level ones (gspo) need rows
    policy_loss = loss_kwargs.pop("policy_loss", "ppo")
    compact = loss_kwargs.get("loss_agg", "token-mean") == "token-mean" and policy_loss == "ppo"
    if compact:
        h = packed.gather(hidden, where, shift=-1)[None]  # [1, n, H]
        loss_kwargs = {k: (v[resp_mask][None] if torch.is_tensor(v) and v.shape == resp_mask.shape else v)
                       for k, v in loss_kwargs.items()}
        loss_kwargs["mask"] = torch.ones_like(h[..., 0], dtype=torch.bool)
        labels = labels[resp_mask][None]
    else:  # the seq-mean-* modes need rows: [B, R, H], 0 off the response
        h = packed.unpack(hidden, shift=-1)[:, prompt_len:]
    values = policy._values(h)
    if compact and values is not None:
        values = _scatter(values[0], resp_mask)
    if bias is not None:  # folded in exactly, as in the padded path
        h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)
        weight = torch.cat([weight, bias.unsqueeze(-1).to(weight.dtype)], dim=-1)
    loss_fn = fused_ppo_loss if policy_loss == "ppo" else _policy_loss(policy_loss)
    loss, stats = loss_fn(h, weight, labels, **loss_kwargs, **kw)
    return loss, stats, values


def _policy_loss(name: str):
    from fastrlhf.models.policy import get_policy_loss

    return get_policy_loss(name)


def _scatter(compact: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``compact [n]`` (row-major over ``mask``) -> ``[B, R]`` with 0 elsewhere; differentiable."""
    out = compact.new_zeros(mask.shape)
    return out.masked_scatter(mask, compact)


__all__ = ["PackedRows", "attn_implementation", "balanced_micro_batches", "block_causal_mask", "body_inputs",
           "default_row_capacity", "first_fit_rows", "head_outputs_packed", "last_token_outputs_packed", "pack_for",
           "pack_rows", "packed_hidden", "policy_forward_packed", "uses_varlen"]

"""Backend choice and input checks shared by every op. No module-level state: each call decides.

The checks are plain functions so that the PyTorch path (``reference.py``, ``losses.py``) and the
Triton dispatchers run exactly the same validation and raise the same messages. They inspect
shapes, dtypes and devices only (no host synchronisation), except ``check_labels_in_range`` on CPU
tensors, where reading the labels costs nothing.
"""
from __future__ import annotations

import math
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3", "abs")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# labels must hold ignore_index (-100) and the mask marker: int8 / uint8 would wrap them round
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether the triton package is installed (it has no wheel for macOS or Windows)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map ``backend`` to "triton" or "torch".

    "auto" picks Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``;
    otherwise (and always when triton is not installed) the PyTorch path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not triton_available():
        return "torch"
    if any(t.is_cuda for t in tensors):
        return "triton"
    return "triton" if interpreter_enabled() else "torch"


def check_loss_agg(loss_agg: str) -> None:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def check_kl_kind(kind: str) -> None:
    if kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}, got {kind!r}")


def check_tensor(name: str, t, *, floating: bool = False, integer: bool = False) -> None:
    """``t`` is a tensor; with ``floating`` one of fp32/bf16/fp16/fp64, with ``integer`` an integer dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32/bf16/fp16/fp64), got {t.dtype}")
    if integer and t.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of int64/int32/int16 (int64 preferred), got "
                        f"{t.dtype}: narrower types cannot hold ignore_index")


def check_same_device(**named: torch.Tensor | None) -> None:
    """All given (non-None) tensors live on one device; the error names each argument's device."""
    present = {k: v for k, v in named.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on the same device, got {where}")


def check_same_shape(shape: torch.Size | tuple, ref_name: str, **named: torch.Tensor | None) -> None:
    """Each given (non-None) tensor has exactly ``shape`` (the shape of argument ``ref_name``)."""
    for k, v in named.items():
        if v is not None and tuple(v.shape) != tuple(shape):
            raise ValueError(f"{k} must have the shape of {ref_name} {tuple(shape)}, got {tuple(v.shape)}")


def check_mask(mask, shape: torch.Size | tuple, ref_name: str, name: str = "mask") -> torch.Tensor:
    """Validate a bool or 0/1 mask of ``shape``; return it as bool (nonzero = valid token)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in INT_DTYPES and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    check_same_shape(shape, ref_name, **{name: mask})
    return mask if mask.dtype == torch.bool else mask != 0


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_chunk_size(chunk_size: int | None, name: str = "chunk_size") -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name} must be a positive int or None, got {chunk_size!r}")


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, *, logits_name: str = "logits") -> int:
    """``logits [..., V]`` floating, ``labels [...]`` integer, same device. Returns ``V``."""
    check_tensor(logits_name, logits, floating=True)
    check_tensor("labels", labels, integer=True)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{logits_name} must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} ({logits_name}.shape[:-1]), "
                         f"got {tuple(labels.shape)}")
    check_same_device(**{logits_name: logits, "labels": labels})
    return logits.shape[-1]


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        bias: torch.Tensor | None = None) -> tuple[int, int]:
    """``hidden [..., H]``, ``weight [V, H]``, ``labels [...]``, ``bias [V]`` or None. Returns ``(H, V)``."""
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    check_tensor("labels", labels, integer=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H] (an lm_head weight), got shape {tuple(weight.shape)}")
    vocab, h = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != h:
        raise ValueError(f"hidden must be [..., H] with H = weight.shape[1] = {h}, got {tuple(hidden.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), "
                         f"got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must be [V] = ({vocab},), got {tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    return h, vocab


def autocast_linear_inputs(hidden, weight, bias=None):
    """Under ``torch.autocast`` on the inputs' device, cast ``hidden``, ``weight``, ``bias`` to the autocast
    dtype, as ``F.linear`` would (the casts are differentiable: an fp32 master weight gets an fp32 grad).

    The op itself then runs with autocast off, so forward and the recomputing backward see the same
    logits. Outside autocast the tensors come back unchanged (mixed dtypes stay an error).
    """
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def check_labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label is in ``[0, vocab_size)`` or equals ``ignore_index``.

    CPU: checked now, ValueError naming the first bad position. CUDA: ``torch._assert_async`` (no host
    sync; a bad label fails the next synchronising call with a device-side assert, never silently).
    """
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if labels.is_cuda:
        torch._assert_async(~bad.any(), f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                         f"labels{list(pos)} = {int(labels[pos])}")


def check_clip(clip_low: float, clip_high: float | None, dual_clip: float | None) -> float:
    """PPO clip range: ``0 <= clip_low < 1``, ``clip_high >= 0`` (default ``clip_low``), ``dual_clip > 1``.

    Returns the resolved ``clip_high``.
    """
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    clip_high = clip_low if clip_high is None else clip_high
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}")
    return clip_high


def check_ppo_inputs(shape: torch.Size | tuple, ref_name: str, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, mask, *, ref_logprobs: torch.Tensor | None = None,
                     kl_coef: float = 0.0, kl_kind: str = "k3", loss_agg: str = "token-mean",
                     clip_low: float = 0.2, clip_high: float | None = None,
                     dual_clip: float | None = None) -> torch.Tensor:
    """Everything ``fused_ppo_loss*`` and ``ppo_policy_loss`` take besides the log-prob source.

    ``shape`` is the ``[B, T]`` token shape (of argument ``ref_name``). Returns the bool mask.
    """
    check_tensor("old_logprobs", old_logprobs, floating=True)
    check_tensor("advantages", advantages, floating=True)
    if ref_logprobs is not None:
        check_tensor("ref_logprobs", ref_logprobs, floating=True)
    elif kl_coef != 0:
        raise ValueError(f"kl_coef={kl_coef!r} needs ref_logprobs (got None)")
    check_same_shape(shape, ref_name, old_logprobs=old_logprobs, advantages=advantages,
                     ref_logprobs=ref_logprobs)
    mask = check_mask(mask, shape, ref_name)
    check_same_device(old_logprobs=old_logprobs, advantages=advantages, mask=mask, ref_logprobs=ref_logprobs)
    check_kl_kind(kl_kind)
    check_loss_agg(loss_agg)
    check_clip(clip_low, clip_high, dual_clip)
    return mask


def check_gae_inputs(rewards: torch.Tensor, values: torch.Tensor, mask, gamma: float,
                     lam: float) -> torch.Tensor:
    """``rewards, values, mask [B, T]``; ``gamma, lam`` finite numbers. Returns the bool mask."""
    check_tensor("rewards", rewards, floating=True)
    check_tensor("values", values, floating=True)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    check_same_shape(rewards.shape, "rewards", values=values)
    mask = check_mask(mask, rewards.shape, "rewards")
    check_same_device(rewards=rewards, values=values, mask=mask)
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not (isinstance(x, (int, float)) and math.isfinite(x)):
            raise ValueError(f"{name} must be a finite number, got {x!r}")
    return mask


def valid_row_index(valid: torch.Tensor) -> torch.Tensor | None:
    """Padding skip of the linear ops: ``valid [N]`` bool -> int64 indices of its True rows (in order), or
    ``None`` when every row is valid (nothing to compact, no copy).

    One host sync per call, here and nowhere else: ``nonzero`` must learn the count to size its output
    (on CUDA the CPU waits for the queued work that produces ``valid``, losing its run-ahead once, a few
    microseconds of launch latency; CPU: none). With the count known on the host, the chunk loops run
    over the valid rows with Python bounds: no sync per chunk. The alternative without any sync (a stable
    sort putting valid rows first, chunks over all N rows) could not skip a single padded row's GEMM, since
    how many chunks hold valid rows is only known on the device.
    """
    idx = valid.nonzero().squeeze(1)
    return None if idx.numel() == valid.numel() else idx


def scatter_rows(x: torch.Tensor, idx: torch.Tensor | None, n: int) -> torch.Tensor:
    """Inverse of ``index_select(0, idx)``: ``x [n_valid, ...]`` -> ``[n, ...]`` with zeros at the other rows
    (differentiable: ``index_copy``'s gradient is ``index_select`` of the upstream gradient)."""
    if idx is None:
        return x
    return x.new_zeros((n, *x.shape[1:])).index_copy(0, idx, x)

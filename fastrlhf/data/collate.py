"""Collating token features into padded batch tensors."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .features import IGNORE_INDEX


def _pad_value(key: str, pad_id: int) -> int:
    if key == "labels" or key.endswith("_labels"):
        return IGNORE_INDEX
    if key == "attention_mask" or key.endswith("_attention_mask"):
        return 0
    if key == "input_ids" or key.endswith("_input_ids"):
        return pad_id
    raise ValueError(f"pad_batch does not know how to pad the sequence key {key!r} "
                     "(known: input_ids, attention_mask, labels and their '<prefix>_' forms)")


def _as_list(value) -> list | None:
    if torch.is_tensor(value):
        return value.tolist() if value.dim() == 1 else None
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return None


def pad_batch(features: Sequence[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stack a list of feature dicts into ``[B, L]`` int64 tensors, ``L`` the longest row of each key.

    Sequence keys are padded by name: ``input_ids`` with ``pad_id``, ``attention_mask`` with 0,
    ``labels`` with -100 (so padding never carries loss); keys ending in ``_input_ids``,
    ``_attention_mask``, ``_labels`` (e.g. ``chosen_input_ids``) likewise. ``padding_side`` is
    ``"right"`` (training) or ``"left"`` (generation: every prompt ends at the last column). Scalar
    keys (numbers, e.g. a preference ``margin``) become a ``[B]`` tensor; any other key is an error.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not features:
        raise ValueError("pad_batch got no features")
    keys = list(features[0])
    for i, f in enumerate(features):
        if set(f) != set(keys):
            raise ValueError(f"features[{i}] has keys {sorted(f)}, features[0] has {sorted(keys)}")
    batch = {}
    for key in keys:
        rows = [_as_list(f[key]) for f in features]
        if all(r is not None for r in rows):
            value = _pad_value(key, pad_id)
            width = max(len(r) for r in rows)
            fill = [[value] * (width - len(r)) for r in rows]
            padded = [p + r if padding_side == "left" else r + p for p, r in zip(fill, rows, strict=True)]
            batch[key] = torch.tensor(padded, dtype=torch.long)
        elif all(isinstance(f[key], (int, float)) and not isinstance(f[key], bool) for f in features):
            batch[key] = torch.tensor([f[key] for f in features])
        else:
            raise ValueError(f"pad_batch cannot collate key {key!r}: "
                             "neither sequences nor numbers in every row")
    return batch

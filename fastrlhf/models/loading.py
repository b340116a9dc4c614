"""Load HF causal LMs and tokenizers from hub names or local directories."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` ... -> ``torch.dtype``; None or "auto" -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def _check_local(name_or_path: str | Path) -> str:
    name = str(name_or_path)
    # A path that looks local but is missing gives a clear error instead of a confusing hub lookup.
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model/tokenizer path {name} does not exist")
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def load_causal_lm(name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
                   **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` for a hub name or a local directory.

    ``dtype=None`` loads float32 (training master weights); ``"auto"`` keeps the checkpoint's dtype.
    """
    torch_dtype = "auto" if dtype == "auto" else (resolve_dtype(dtype) or torch.float32)
    return AutoModelForCausalLM.from_pretrained(_check_local(name_or_path), dtype=torch_dtype, **kwargs)


def load_tokenizer(name_or_path: str | Path, *, padding_side: str = "right",
                   **kwargs) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with ``padding_side`` set and a pad token guaranteed.

    Tokenizers without a pad token (GPT-2, Llama) reuse EOS as pad: every consumer here passes an
    explicit attention mask, so pad == eos is safe.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tok = AutoTokenizer.from_pretrained(_check_local(name_or_path), padding_side=padding_side, **kwargs)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok

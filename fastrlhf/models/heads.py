"""Scalar heads on a causal LM's transformer body: reward models and value models (critics).

A head model keeps the body of any HF causal LM (``backbone.base_model``: ``LlamaModel`` for
Llama/Qwen2/Mistral, ``GPT2Model`` for GPT-2; the LM head is dropped) and adds
``Linear(hidden, K, bias=False)``. Position ids are derived from the attention mask, so left padding,
right padding and no padding give the same outputs, also for learned absolute positions (GPT-2).
Head outputs are float32 whatever the body's dtype.

Checkpoint layout (``save_pretrained(dir)``, one call to load back, nothing from the hub):
``config.json`` (the backbone config), ``model.safetensors`` (``body.*`` and ``head.weight``),
``fastrlhf_head.json`` (class, head names and weights, reward normalization stats). A model exported
from FSDP2 shards (``engine.checkpoint.export_head_model``) has ``model-0000i-of-0000N.safetensors``
files of whole layers and ``model.safetensors.index.json`` instead of ``model.safetensors``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from .loading import resolve_dtype

HEAD_FILE = "fastrlhf_head.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` int64 positions counting only valid tokens: ``clamp(cumsum(mask) - 1, min=0)``.

    The first real token of every row gets position 0 whatever the padding side; pads get 0 or
    repeat the previous position (their outputs are never read).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64 index of each row's last valid token (0 for a row with none)."""
    t = attention_mask.shape[-1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.zeros_like(pos)).amax(-1)


def body_of(backbone: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (or the body itself when given one)."""
    body = getattr(backbone, "base_model", None)
    if body is None and hasattr(backbone, "get_decoder"):
        body = backbone.get_decoder()
    if body is None or not hasattr(body, "config"):
        raise TypeError(f"cannot find the transformer body of {type(backbone).__name__}; pass an HF "
                        "causal LM (it must have .base_model) or its AutoModel body")
    return body


def hidden_size_of(config: PretrainedConfig) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot read the hidden size of {type(config).__name__}")


class ScalarHeadModel(nn.Module):
    """Transformer body + ``Linear(hidden, num_heads, bias=False)``; base of the reward and value models.

    ``head_init_std``: None -> ``1 / sqrt(hidden + 1)`` (Ziegler et al. 2019); 0.0 -> zero head.
    """

    kind = "scalar_head"

    def __init__(self, backbone: nn.Module, *, num_heads: int = 1, head_init_std: float | None = None):
        super().__init__()
        self.body = body_of(backbone)
        self.config = self.body.config
        hidden = hidden_size_of(self.config)
        self.head = nn.Linear(hidden, num_heads, bias=False)
        std = (hidden + 1) ** -0.5 if head_init_std is None else head_init_std
        # Head in fp32 even for a bf16 body: the scalar is tiny and its precision matters for BT / GAE.
        self.head.to(dtype=torch.float32, device=next(self.body.parameters()).device)
        with torch.no_grad():
            if std > 0:
                self.head.weight.normal_(0.0, std)
            else:
                self.head.weight.zero_()

    # -- forward pieces ----------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` last hidden states of the body, positions taken from ``attention_mask``."""
        out = self.body(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    def head_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, K]`` fp32 head outputs at every position."""
        h = self.hidden_states(input_ids, attention_mask)
        with torch.autocast(h.device.type, enabled=False):  # fp32 head under bf16 autocast too
            return self.head(h.to(self.head.weight.dtype)).float()

    def last_token_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` fp32 head outputs at each row's last valid token (0 for rows with none).

        Only the last tokens go through the head: no ``[B, T, K]`` buffer.
        """
        h = self.hidden_states(input_ids, attention_mask)
        idx = last_token_index(attention_mask)
        last = h[torch.arange(h.shape[0], device=h.device), idx]
        with torch.autocast(h.device.type, enabled=False):
            out = self.head(last.to(self.head.weight.dtype)).float()
        has_any = attention_mask.bool().any(-1, keepdim=True)
        return torch.where(has_any, out, torch.zeros_like(out))

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.body.gradient_checkpointing_enable(**kwargs)

    # -- persistence -------------------------------------------------------------------------------
    def _head_meta(self) -> dict[str, Any]:
        return {}

    def save_pretrained(self, directory: str | Path, *, tokenizer=None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Backbone config, safetensors weights and head metadata into ``directory`` (+ tokenizer).
        ``state_dict``: the full weights when the module itself holds shards (FSDP2)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        if any(".lora_" in k for k in state):  # LoRA (fastrlhf.models.lora): save the merged weights
            from .lora import merged_state_dict
            state = merged_state_dict(self)
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        self.save_metadata(directory, tokenizer=tokenizer)

    def save_metadata(self, directory: str | Path, *, tokenizer=None) -> None:
        """Everything of a checkpoint but the weights: backbone config, ``fastrlhf_head.json`` (+ tokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        meta = {"class": self.class_name(), "num_heads": self.head.out_features, **self._head_meta()}
        (directory / HEAD_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def class_name(self) -> str:
        """The model class saved in the metadata: ours, not FSDP2's dynamic ``FSDP<Class>`` subclass."""
        from torch.distributed.fsdp import FSDPModule
        return next(c.__name__ for c in type(self).__mro__
                    if issubclass(c, ScalarHeadModel) and not issubclass(c, FSDPModule))

    @classmethod
    def _read(cls, directory: str | Path, dtype) -> tuple[nn.Module, dict, dict]:
        directory = Path(directory)
        weights = WEIGHTS_FILE if not (directory / INDEX_FILE).is_file() else INDEX_FILE
        for name in ("config.json", weights, HEAD_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a fastrlhf head-model checkpoint: {name} "
                                        f"missing (write one with {cls.__name__}.save_pretrained)")
        config = AutoConfig.from_pretrained(directory)
        body = AutoModel.from_config(config, dtype=resolve_dtype(dtype) or torch.float32)
        meta = json.loads((directory / HEAD_FILE).read_text())
        if weights == INDEX_FILE:  # sharded export: one file per bucket of whole layers
            files = sorted(set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()))
            return body, meta, _LazyWeights(*(directory / f for f in files))
        return body, meta, _LazyWeights(directory / WEIGHTS_FILE)

    def _load_weights(self, state, directory) -> None:
        """Copy ``state`` (a dict, or the file's tensors read one at a time) into the parameters."""
        if isinstance(state, _LazyWeights):
            return state.copy_into(self, directory)
        missing, unexpected = self.load_state_dict(state, strict=False)
        # Non-persistent buffers (rotary inv_freq) are rebuilt by the config; anything else must match.
        if missing or unexpected:
            raise ValueError(f"{directory}: weights do not match {type(self).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")


class _LazyWeights:
    """A safetensors file copied into a model one tensor at a time: loading holds the model plus one
    tensor, not the model plus a second full copy of its weights."""

    def __init__(self, *paths: Path):
        self.paths = paths

    def copy_into(self, model: nn.Module, directory) -> None:
        from safetensors import safe_open
        targets = dict(model.state_dict(keep_vars=True))
        files = [safe_open(str(p), framework="pt") for p in self.paths]
        keys = [(f, k) for f in files for k in f.keys()]
        missing = sorted(set(targets) - {k for _, k in keys})
        unexpected = sorted({k for _, k in keys} - set(targets))
        if missing or unexpected:  # non-persistent buffers are not in state_dict(): never "missing"
            raise ValueError(f"{directory}: weights do not match {type(model).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for f, key in keys:
                targets[key].copy_(f.get_tensor(key))


class RewardModel(ScalarHeadModel):
    """Bradley-Terry reward model: ``forward(input_ids, attention_mask) -> [B]`` fp32 scores read at each
    row's last non-padding token (Ouyang et al. 2022, InstructGPT §3.5).

    ``reward_mean`` / ``reward_std`` (set by the reward trainer from its eval/train scores) travel with the
    checkpoint; :meth:`normalize` applies them at PPO time.
    """

    kind = "reward"

    def __init__(self, backbone: nn.Module, *, head_init_std: float | None = None,
                 reward_mean: float | None = None, reward_std: float | None = None):
        super().__init__(backbone, num_heads=1, head_init_std=head_init_std)
        self.reward_mean = reward_mean
        self.reward_std = reward_std

    supports_packing = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                packing: bool = False) -> torch.Tensor:
        if packing:  # valid tokens only, attention confined to each row (fastrlhf.models.packing)
            from .packing import last_token_outputs_packed
            return last_token_outputs_packed(self, input_ids, attention_mask)[:, 0]
        return self.last_token_outputs(input_ids, attention_mask)[:, 0]

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores - reward_mean) / reward_std`` with the saved stats (identity when none are saved)."""
        if self.reward_mean is None or self.reward_std is None:
            return scores
        return (scores - self.reward_mean) / max(self.reward_std, 1e-8)

    def _head_meta(self) -> dict[str, Any]:
        return {"reward_mean": self.reward_mean, "reward_std": self.reward_std}

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype=None, device=None) -> RewardModel:
        """Load a checkpoint written by :meth:`save_pretrained` (fp32 unless ``dtype`` is given)."""
        body, meta, state = cls._read(directory, dtype)
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{directory} holds a {meta.get('class')}, not a {cls.__name__}")
        model = cls(body, reward_mean=meta.get("reward_mean"), reward_std=meta.get("reward_std"))
        model._load_weights(state, directory)
        return model.to(device) if device is not None else model


class ValueModel(ScalarHeadModel):
    """Critic: ``forward(input_ids, attention_mask) -> [B, T]`` fp32 values at every position (0 at
    padding). The value head starts at zero unless ``head_init_std`` is given."""

    kind = "value"

    def __init__(self, backbone: nn.Module, *, head_init_std: float | None = 0.0):
        super().__init__(backbone, num_heads=1, head_init_std=head_init_std)

    supports_packing = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                packing: bool = False) -> torch.Tensor:
        if packing:  # valid tokens only, attention confined to each row (fastrlhf.models.packing)
            from .packing import head_outputs_packed
            return head_outputs_packed(self, input_ids, attention_mask)[..., 0]
        values = self.head_outputs(input_ids, attention_mask)[..., 0]
        return torch.where(attention_mask.bool(), values, torch.zeros_like(values))

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype=None, device=None) -> ValueModel:
        """Load a ValueModel checkpoint, or initialise the critic from a RewardModel checkpoint
        (body and head copied: the usual critic init in RLHF)."""
        body, meta, state = cls._read(directory, dtype)
        if meta.get("class") not in (cls.__name__, RewardModel.__name__):
            raise ValueError(f"{directory} holds a {meta.get('class')}; a ValueModel loads a ValueModel "
                             "or RewardModel checkpoint")
        model = cls(body)
        model._load_weights(state, directory)
        return model.to(device) if device is not None else model


def load_head_model(directory: str | Path, **kwargs) -> ScalarHeadModel:
    """Any fastrlhf head-model checkpoint, dispatched on the class saved in ``fastrlhf_head.json``."""
    from .multihead import MultiHeadRewardModel

    classes = {c.__name__: c for c in (RewardModel, ValueModel, MultiHeadRewardModel)}
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: {HEAD_FILE} missing; not a fastrlhf head-model checkpoint")
    name = json.loads(path.read_text()).get("class")
    if name not in classes:
        raise ValueError(f"{directory}: unknown head-model class {name!r}")
    return classes[name].from_pretrained(directory, **kwargs)

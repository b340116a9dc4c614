"""Shared trainer plumbing: device and autocast choice, seeding, optimizer and schedule, grad clipping,
RNG state, atomic checkpoint directories and resume bookkeeping.

Everything here takes explicit arguments (no config objects, no globals), so SFT, reward-model and PPO
trainers share it. Checkpoint layout used by the trainers:

    output_dir/checkpoints/step-00000010/   model files + trainer_state.pt, written atomically
    output_dir/final/                        the final model (from_pretrained loads it)
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from fastrlhf.config import ConfigError
from fastrlhf.data import DataError, read_rows, validate_rows
from fastrlhf.telemetry.metrics import MetricsLogger, truncate_metrics
from fastrlhf.utils import set_seed  # noqa: F401  (re-exported: trainers call common.set_seed)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def validate_common(cfg) -> None:
    """Checks shared by the SFT and reward configs; errors name the key."""
    name = type(cfg).__name__
    for key in ("model", "data", "output_dir"):
        if not getattr(cfg, key):
            raise ConfigError(f"{name}: {key!r} is required")
    for key in ("max_length", "epochs", "batch_size", "micro_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{name}: {key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("eval_every", "save_every", "max_steps", "log_every", "keep_checkpoints"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{name}: {key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.lr_scheduler not in ("cosine", "linear", "constant", "constant_with_warmup"):
        raise ConfigError(f"{name}: lr_scheduler must be 'cosine' or 'linear' (or 'constant[_with_warmup]'), "
                          f"got {cfg.lr_scheduler!r}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ConfigError(f"{name}: warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.lr <= 0:
        raise ConfigError(f"{name}: lr must be > 0, got {cfg.lr}")
    check_dtype(name, cfg.dtype)
    budget = cfg.max_tokens_per_micro_batch
    if budget is not None and budget < cfg.max_length:
        raise ConfigError(f"{name}: max_tokens_per_micro_batch must be >= max_length={cfg.max_length} "
                          f"(one row must fit), got {budget}")
    if cfg.num_threads < 0:
        raise ConfigError(f"{name}: num_threads must be >= 0 (0: torch's default), got {cfg.num_threads}")


DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto")


def check_dtype(name: str, dtype: str | None) -> None:
    """``dtype`` is a deprecated alias of ``precision`` (None: not given)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{name}: dtype must be one of {list(DTYPES)}, got {dtype!r}")


def check_max_length(cfg, model) -> None:
    """``max_length`` must fit the model's positions: past them GPT-2's position table indexes out of
    range (a crash mid-run, a device assert on CUDA) and RoPE models run beyond their trained context."""
    config = getattr(model, "config", None) or getattr(getattr(model, "body", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ConfigError(f"{type(cfg).__name__}: max_length={cfg.max_length} exceeds the model's "
                          f"{limit} positions (max_position_embeddings / n_positions)")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Settings shared by the SFT and reward-model stages, each default held once here
    (``SFTConfig`` and ``RewardConfig`` add their own and document every key)."""

    model: str = ""
    data: str = ""
    output_dir: str = ""
    eval_data: str | None = None
    tokenizer: str | None = None
    data_split: str = "train"
    eval_split: str = "test"
    max_length: int = 1024
    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 64
    micro_batch_size: int = 8
    # rows (sequences / pairs) per forward grouped by their token count instead of micro_batch_size:
    # a balanced bin-packing of row lengths, each micro-batch at most this many tokens (None: by rows)
    max_tokens_per_micro_batch: int | None = None
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32 (fastrlhf.engine.precision)
    offload: str = "auto"  # auto | none | optimizer | params | all
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    bf16: bool | None = None  # deprecated alias of precision (bf16 / fp32), removed in 0.3
    dtype: str | None = None  # deprecated alias of precision (bfloat16 / float32), removed in 0.3
    device: str = "auto"
    gradient_checkpointing: bool = False
    chat_template: bool = False
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    max_steps: int = 0
    drop_overlong: bool = True
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    num_threads: int = 1
    resume: bool = True
    # LoRA through PEFT (fastrlhf.models.lora): 0 = full fine-tuning; alpha None = 2 * rank; target modules
    # None = every linear of the transformer blocks. Checkpoints hold the merged model + adapter.safetensors.
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        validate_common(self)
        validate_scale_keys(self)


def validate_scale_keys(cfg) -> None:
    """``precision`` (with the deprecated ``bf16`` / ``dtype`` read as aliases), ``offload``, ``adam_*``."""
    from fastrlhf.engine.precision import OFFLOADS, PRECISIONS, legacy_precision
    name = type(cfg).__name__
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"{name}: precision must be one of {'|'.join(PRECISIONS)}, got {cfg.precision!r}")
    object.__setattr__(cfg, "precision", legacy_precision(name, cfg.precision, bf16=getattr(cfg, "bf16", None),
                                                         dtype=cfg.dtype))
    if cfg.offload not in OFFLOADS:
        raise ConfigError(f"{name}: offload must be one of {'|'.join(OFFLOADS)}, got {cfg.offload!r}")
    betas = tuple(cfg.adam_betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{name}: adam_betas must be two numbers in [0, 1), got {list(cfg.adam_betas)}")
    if not cfg.adam_eps > 0:
        raise ConfigError(f"{name}: adam_eps must be > 0, got {cfg.adam_eps}")


def maybe_apply_lora(cfg, model):
    """``apply_lora`` with the config's ``lora_*`` keys when ``lora_rank > 0``; else ``model`` unchanged."""
    if cfg.lora_rank < 0:
        raise ConfigError(f"{type(cfg).__name__}: lora_rank must be >= 0, got {cfg.lora_rank}")
    if not cfg.lora_rank:
        return model
    from fastrlhf.models.lora import apply_lora, has_lora

    if has_lora(model):  # adapted while loading (lora_source: before FSDP2 sharding)
        return model
    try:
        return apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules)
    except ValueError as err:
        raise ConfigError(f"{type(cfg).__name__}: {err}") from None


def lora_source(cfg, source):
    """``source`` (``engine.loading.ModelSource``) with the config's adapters injected into the built and
    the loaded model, so that FSDP2 shards the adapted model (frozen base and adapters in the same units)
    and rank 0's adapter initialization reaches every rank. ``source`` itself when ``lora_rank`` is 0."""
    if not cfg.lora_rank:
        return source
    from fastrlhf.engine.loading import ModelSource
    return ModelSource(build=lambda: maybe_apply_lora(cfg, source.build()),
                       load=lambda: maybe_apply_lora(cfg, source.load()))


ADAPTER_FILE = "adapter.safetensors"


def save_adapters(model, directory) -> None:
    """The trainable tensors of a LoRA model (adapters, heads) next to its merged export, for resume.
    Under FSDP2 a collective (each tensor gathered whole); rank 0 writes."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from fastrlhf.models.lora import adapter_state_dict

    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).contiguous().cpu()  # FSDP2: a collective
             for k, v in adapter_state_dict(model).items()}
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        save_file(state, str(Path(directory) / ADAPTER_FILE))


def load_adapters(model, directory) -> None:
    """Load ``save_adapters``' tensors back into an adapted model (names must all match)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / ADAPTER_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{directory}/{ADAPTER_FILE}: tensors {unknown[:3]} are not in the model")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ----------------------------------------------------------------------------------------------- device
def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available else CPU; anything else as given ("cpu", "cuda:1")."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here (use device=cpu or auto)")
    return dev


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (CPU or CUDA) when ``bf16``; a no-op otherwise. Trainers pass the
    resolved precision (``precision: auto`` is fp32 on CPU) and False for FSDP2 modules, whose mixed
    precision policy casts the parameters itself."""
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------- seed
def rng_state() -> dict[str, Any]:
    """Snapshot of every RNG a trainer touches (restore with :func:`set_rng_state`)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------- optimizer, schedule
def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (ndim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    from fastrlhf.engine.precision import adamw
    return adamw(groups, lr=lr, betas=betas, eps=eps)  # fused (plain tensors) or foreach (FSDP2 shards)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, *, num_training_steps: int,
                    warmup_ratio: float = 0.0):
    """``transformers.get_scheduler(name)`` with ``ceil(warmup_ratio * num_training_steps)`` warmup steps.

    ``name`` is any transformers schedule ("cosine", "linear", "constant_with_warmup", ...).
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = math.ceil(warmup_ratio * num_training_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps)


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip the global L2 grad norm to ``max_norm`` (None or <= 0: measure only). Returns the norm
    before clipping as a 0-dim fp32 tensor (no host sync here)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros((), dtype=torch.float32)
    if max_norm is None or max_norm <= 0:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()  # FSDP2: a DTensor


# ------------------------------------------------------------------------------------------ checkpoints
@contextlib.contextmanager
def atomic_save_dir(final_dir: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yields a temporary sibling; on success it is renamed to ``final_dir``.

    A crash inside the block leaves ``final_dir`` as it was (the half-written temp dir is removed, or
    left with a ``.tmp-`` prefix that :func:`latest_checkpoint` ignores). An existing ``final_dir`` is
    replaced only after the new one is complete.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and _disk_full(final_dir.parent):
            # writers report a full disk in their own words (torch.save: "unexpected pos ...")
            first = str(err).splitlines()[0] if str(err) else ""
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {final_dir} "
                                        f"({type(err).__name__}: {first})") from None
        raise
    old = None
    if final_dir.exists():
        old = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _disk_full(path: Path, min_free: int = 16 * 2**20) -> bool:
    try:
        return shutil.disk_usage(path).free < min_free
    except OSError:
        return False


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints`` (or None)."""
    from fastrlhf.engine import checkpoint as dcp_ckpt
    return dcp_ckpt.latest_checkpoint(Path(output_dir) / CHECKPOINTS, marker=TRAINER_STATE)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step checkpoints (keep <= 0: keep all)."""
    from fastrlhf.engine import checkpoint as dcp_ckpt
    dcp_ckpt.prune_checkpoints(Path(output_dir) / CHECKPOINTS, keep)


def _plain_rng_state() -> dict[str, Any]:
    """:func:`rng_state` as tensors, lists and numbers only (what ``torch.load(weights_only=True)`` reads)."""
    state = rng_state()
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    plain = {"python": [int(version), torch.tensor(internal, dtype=torch.int64),
                        None if gauss is None else float(gauss)],
             "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)],
             "torch": state["torch"]}
    if "cuda" in state:
        plain["cuda"] = list(state["cuda"])
    return plain


def _rng_from_plain(plain: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = plain["python"]
    name, keys, pos, has_gauss, cached = plain["numpy"]
    state = {"python": (int(version), tuple(int(x) for x in internal.tolist()), gauss),
             "numpy": (name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)),
             "torch": plain["torch"]}
    if "cuda" in plain:
        state["cuda"] = plain["cuda"]
    return state


def save_trainer_state(directory: str | Path, *, step: int, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None, extra: dict | None = None) -> None:
    """Optimizer, scheduler, step, every RNG and ``extra`` into ``directory/trainer_state.pt``.

    Only tensors, lists, dicts, strings and numbers are written (RNG states converted), so
    :func:`read_trainer_state` reads it with ``torch.load(weights_only=True)``: a checkpoint from a
    shared or downloaded run can never execute code. Write this last inside :func:`atomic_save_dir`:
    its presence marks the checkpoint complete.
    """
    state = {"step": int(step), "rng": _plain_rng_state(), "extra": extra or {},
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    torch.save(state, Path(directory) / TRAINER_STATE)


def read_trainer_state(directory: str | Path) -> dict:
    """``directory/trainer_state.pt`` read with ``weights_only=True`` (tensors and plain containers only);
    a file holding anything else (a pickled object, possibly one that would run code) is refused."""
    path = Path(directory) / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, or a truncated/foreign file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: refusing to load a trainer state that is not plain tensors/numbers "
                          f"(torch.load weights_only=True failed: {first}); delete that checkpoint or use "
                          "another output_dir") from None


def load_trainer_state(directory: str | Path, *, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None, restore_rng: bool = True, state: dict | None = None) -> dict:
    """Inverse of :func:`save_trainer_state`; returns ``{"step", "extra", ...}``. ``state``: an already
    read ``trainer_state.pt`` (to avoid reading a large optimizer state twice)."""
    if state is None:
        state = read_trainer_state(directory)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(_rng_from_plain(state["rng"]))
    return state


def num_optimizer_steps(num_rows: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a run: ``epochs * ceil(num_rows / batch_size)`` (last partial batch kept)."""
    if num_rows < 1:
        raise ValueError("no training rows")
    return epochs * math.ceil(num_rows / batch_size)


def epoch_order(num_rows: int, *, seed: int, epoch: int) -> list[int]:
    """The row order of ``epoch``: a permutation fixed by (seed, epoch), so a resumed run sees the same
    batches as one that never stopped, whatever the global RNG did in between."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=g).tolist()


# ------------------------------------------------------------------------------------------------- data
def format_prompt(tokenizer, prompt: str, *, chat_template: bool) -> str:
    """``prompt`` as the model sees it: with ``chat_template`` and a tokenizer that has one, a single user
    turn rendered with the generation prompt (``<|im_start|>user ... <|im_start|>assistant\n`` for Qwen);
    otherwise the text unchanged. SFT, reward-model and PPO prompts must be formatted the same way."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def load_rows(rows: list[dict] | None, source: str | None, *, kind: str, split: str) -> list[dict] | None:
    """``rows`` validated as ``kind`` rows when given in memory, else ``read_rows(source)``; None if neither.

    Every row is checked before anything trains: the first bad one raises ``DataError`` naming the
    file and line (or ``<rows>`` and the index for in-memory rows).
    """
    if rows is not None:
        return validate_rows(((f"row index {i}", r) for i, r in enumerate(rows)), kind=kind, source="<rows>")
    if source is None:
        return None
    return read_rows(source, kind=kind, split=split)


def report_dropped(source: str, dropped: int, total: int, first: str | None) -> None:
    """One line for the rows dropped as longer than the length limit (nothing is ever cut)."""
    if dropped:
        print(f"[fastrlhf] {source}: dropped {dropped} of {total} rows longer than the length limit "
              f"(first: {first})", flush=True)


def featurize(rows: list[dict], make, *, source: str, drop_overlong: bool) -> list:
    """``[make(row) for row in rows]``; a row ``make`` rejects stops the run with ``DataError`` naming it,
    except rows too long for ``max_length`` when ``drop_overlong`` (their count is printed)."""
    out, dropped, first = [], 0, None
    locations = getattr(rows, "locations", None)  # fastrlhf.data.Rows from read_rows / validate_rows
    for i, row in enumerate(rows):
        try:
            out.append(make(row))
        except ValueError as err:
            where = locations[i] if locations else f"row index {i}"
            if drop_overlong and "max_length" in str(err):
                dropped += 1
                first = first or f"{where}: {err}"
                continue
            hint = " (drop_overlong: true drops such rows)" if "max_length" in str(err) else ""
            raise DataError(source, where, f"{err}{hint}") from None
    report_dropped(source, dropped, len(rows), first)
    if not out:
        raise DataError(source, None, "no row fits max_length")
    return out


# ------------------------------------------------------------------------------------------ step loop
# Config keys that may change between a crashed run and its resumption (they do not change the math).
RESUMABLE_KEYS = frozenset({"progress", "tensorboard", "wandb", "num_threads", "log_every", "eval_every",
                            "save_every", "keep_checkpoints", "resume", "device"})


def config_snapshot(cfg, bookkeeping: frozenset[str] | set[str]) -> dict:
    """``cfg`` as a JSON-ready dict without the ``bookkeeping`` keys (those that may change between a
    crashed run and its resumption); sections stay nested. Through JSON, so a dict read back from a
    ``{stage}_config.json`` compares equal (tuples become lists)."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in bookkeeping}
    return json.loads(json.dumps(data, default=str))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_config(path: str | Path, mine: dict, *, stage: str, hint: str) -> None:
    """The one config-drift check of every stage: ``path`` (``output_dir/{stage}_config.json``, written
    when the run started) must equal ``mine`` (a :func:`config_snapshot`); otherwise ``ConfigError``
    naming the keys that differ (dotted for sections). A missing file is a fresh run: nothing to check."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable {stage} config ({err}); {hint}") from None
    a, b = _flat(saved), _flat(mine)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise ConfigError(f"{path.parent} holds a {stage} run with a different config (keys {diff}); {hint}")


def write_config(path: str | Path, mine: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(mine, indent=2) + "\n")
    os.replace(tmp, path)


class StepTrainer:
    """The loop shared by the SFT and reward trainers: epochs of shuffled batches of row indices,
    logging, periodic eval and checkpoints, resume from the last complete checkpoint, final save.

    A subclass sets ``stage``, ``cfg`` (with ``output_dir``, ``seed``, ``epochs``, ``batch_size``, ``lr``,
    ``weight_decay``, ``lr_scheduler``, ``warmup_ratio``, ``max_steps`` and the loop keys), ``model``,
    ``device``, ``num_rows`` and implements ``train_step(indices) -> dict``, ``evaluate() -> dict``,
    ``save_model(dir)`` and ``load_model(dir)``. Then ``run_loop()`` trains and returns the final metrics.
    """

    stage = ""
    runtime = None  # fastrlhf.engine.runtime.Runtime (setup_runtime); None: one process, no FSDP
    fsdp = False
    autocast_bf16 = False

    # -- one runtime for every stage: process group, precision, FSDP2 (fastrlhf.engine) ---------------
    def setup_runtime(self, runtime=None) -> None:
        """Process group (under torchrun), device and resolved ``precision``. ``runtime``: an existing
        one (the demo passes a one-process runtime to train on rank 0 alone)."""
        from fastrlhf.engine.precision import resolve_precision
        from fastrlhf.engine.runtime import init_runtime
        cfg = self.cfg
        self.runtime = runtime or init_runtime(None if cfg.device in (None, "auto") else cfg.device)
        self.device = self.runtime.device
        self.precision = resolve_precision(cfg.precision, self.device)
        # FSDP2 over several ranks, or in one GPU process (runtime.fsdp: a 1-rank group); LoRA in one
        # process stays a plain module (as before FSDP2 supported it: the tested single-GPU path)
        self.fsdp = self.world_size > 1 or (self.runtime.fsdp and not getattr(cfg, "lora_rank", 0))

    @property
    def is_main(self) -> bool:
        return self.runtime is None or self.runtime.is_main

    @property
    def world_size(self) -> int:
        return 1 if self.runtime is None else self.runtime.world_size

    def place_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 over the process group when there is one (``precision`` as its mixed-precision policy,
        ``offload: params|all`` as CPU offload), a plain module on the device otherwise (bf16 then by
        autocast); gradient checkpointing when configured."""
        from fastrlhf.engine.fsdp import is_fsdp, shard_model
        from fastrlhf.engine.precision import enable_gradient_checkpointing
        cfg = self.cfg
        if is_fsdp(model):  # already sharded by engine.loading (rank 0 read it)
            pass
        elif self.fsdp:
            model = shard_model(model, device=self.device, train=True, precision=self.precision,
                                offload_params=cfg.offload in ("params", "all"))
        else:
            model = model.to(self.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.autocast_bf16 = self.precision == "bf16" and not self.fsdp
        return model

    def load_sharded(self, source) -> torch.nn.Module | None:
        """Under a process group: the model of ``source`` (``engine.loading.ModelSource``) read by rank 0
        and sent to every rank as FSDP2 shards; None in one process (the caller loads it plainly)."""
        if not self.fsdp:
            return None
        from fastrlhf.engine.loading import materialize
        return materialize(self.runtime, source, train=True, precision=self.precision,
                           offload_params=self.cfg.offload in ("params", "all"))

    def local_rows(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's share of a global batch (every ``world_size``-th row) and whether it is real: a rank
        left without rows gets the batch's first row to run a zero-weight pass (FSDP2's collectives need
        every rank in every forward and backward)."""
        mine = indices[self.runtime.rank::self.world_size] if self.world_size > 1 else list(indices)
        return (mine, True) if mine else (indices[:1], False)

    def group_rows(self, features: list, tokens) -> list[list]:
        """``features`` in micro-batches: ``micro_batch_size`` rows each, or, with
        ``max_tokens_per_micro_batch``, a balanced bin-packing of ``tokens(feature)`` under that budget
        (``fastrlhf.models.packing.balanced_micro_batches``). Losses are weighted by their share of the
        global batch, so the grouping does not change the gradient."""
        budget = getattr(self.cfg, "max_tokens_per_micro_batch", None)
        if budget is None:
            mbs = self.cfg.micro_batch_size
            return [features[i:i + mbs] for i in range(0, len(features), mbs)]
        from fastrlhf.models.packing import balanced_micro_batches

        bins = balanced_micro_batches([tokens(f) for f in features], budget)
        return [[features[i] for i in b] for b in bins if b]

    def even_micro_batches(self, micro_batches: list[dict], real: bool = True) -> list[dict]:
        """Pad this rank's micro-batches with zero-weight copies (key ``dummy``) to the largest count on
        any rank, so every rank runs the same number of forwards and backwards."""
        if not real:
            micro_batches = [{**micro_batches[0], "dummy": torch.ones(())}]
        if self.world_size == 1:
            return micro_batches
        n = torch.tensor([len(micro_batches)], device=self.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        pad = [{**micro_batches[0], "dummy": torch.ones(())}] * (int(n) - len(micro_batches))
        return micro_batches + pad

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        out = value.detach().clone().to(self.device)
        torch.distributed.all_reduce(out)
        return out

    def prepare_data(self, kind: str, train_rows: list[dict] | None, eval_rows: list[dict] | None) -> None:
        """Validate and featurize (``self._features``) the train and eval rows, from memory or from
        ``cfg.data`` / ``cfg.eval_data``; every row is checked before any model is touched."""
        cfg = self.cfg
        train = load_rows(train_rows, cfg.data, kind=kind, split=cfg.data_split)
        evals = load_rows(eval_rows, cfg.eval_data, kind=kind, split=cfg.eval_split)
        self.train_features = self._features(train, cfg.data if train_rows is None else "<train_rows>")
        self.eval_features = (self._features(evals, cfg.eval_data if eval_rows is None else "<eval_rows>")
                              if evals else [])
        self.num_rows = len(self.train_features)

    def setup_loop(self) -> None:
        cfg = self.cfg
        self.out = Path(cfg.output_dir)
        self.steps_per_epoch = math.ceil(self.num_rows / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler,
                                         num_training_steps=self.total_steps, warmup_ratio=cfg.warmup_ratio)
        self.logger = MetricsLoggerLazy(self.out, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                        enabled=self.is_main)
        check_max_length(cfg, self.model)

    @property
    def final_dir(self) -> Path:
        return Path(self.cfg.output_dir) / "final"

    @property
    def result_path(self) -> Path:
        return Path(self.cfg.output_dir) / f"{self.stage}_result.json"

    def batch_indices(self, step: int) -> list[int]:
        """Row indices of optimizer step ``step`` (1-based): fixed by (seed, step), resume-safe."""
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        order = epoch_order(self.num_rows, seed=self.cfg.seed, epoch=epoch)
        return order[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]

    def optimizer_step(self) -> dict[str, torch.Tensor | float]:
        """Clip, step optimizer and schedule, zero grads; returns ``grad_norm`` and the ``lr`` used."""
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):  # one sync per optimizer step; never write NaN into the weights
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"{self.stage}: non-finite gradient norm ({float(grad_norm)}) at step "
                                     f"{self.scheduler.last_epoch + 1}; nothing was applied (lower lr?)")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, "lr": lr}

    def run_loop(self) -> dict:
        if self.cfg.resume:  # a finished or interrupted run continues only under the config it started with
            self._check_same_config()
            if self.result_path.is_file() and self.final_dir.is_dir():
                return json.loads(self.result_path.read_text())  # the run already finished: same answer
        start = self._resume() if self.cfg.resume else self._fresh()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=start, desc=self.stage,
                   disable=not (self.cfg.progress and self.is_main))
        for step in range(start + 1, self.total_steps + 1):
            t0 = time.perf_counter()
            stats = self.last_stats = self.train_step(self.batch_indices(step))
            stats["epoch"] = (step - 1) // self.steps_per_epoch
            stats["step_time"] = time.perf_counter() - t0
            if step % max(self.cfg.log_every, 1) == 0 or step == self.total_steps:
                row = self.logger.log(step, stats, stage=self.stage)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "accuracy") if k in row})
            if self.cfg.eval_every and step % self.cfg.eval_every == 0 and step < self.total_steps:
                metrics = self.evaluate()
                if metrics:
                    self.logger.log(step, metrics, stage=self.stage)
                self.model.train()
            if self.cfg.save_every and step % self.cfg.save_every == 0 and step < self.total_steps:
                self._checkpoint(step)
            bar.update(1)
        bar.close()
        return self._finish()

    def final_evaluate(self) -> dict:
        """Metrics of the finished model (the subclass may add side effects: plots, stats)."""
        return self.evaluate()

    def _finish(self) -> dict:
        metrics = self.final_evaluate()
        if metrics:
            self.logger.log(self.total_steps, metrics, stage=self.stage)
        if getattr(self, "last_stats", None) and "loss" in self.last_stats:
            metrics = {"train_loss": float(self.last_stats["loss"]), **metrics}
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.fsdp:  # a collective export: every rank gathers, rank 0 writes
            self._save_final_sharded()
        else:
            with atomic_save_dir(self.final_dir) as tmp:
                self.save_model(tmp)
        if self.is_main:
            self.result_path.write_text(json.dumps(result, indent=2) + "\n")
            # The run is complete (a re-run returns result_path): step checkpoints, with their optimizer
            # state (2x the weights for AdamW), are no longer needed.
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
        self.logger.close()
        if self.runtime is not None:
            self.runtime.barrier()
        return result

    def _save_final_sharded(self) -> None:
        tmp = self.final_dir.parent / f".tmp-{self.final_dir.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.runtime.barrier()
        self.save_model(tmp)  # collective: FSDP2 shards gathered a bucket at a time, rank 0 writes
        self.runtime.barrier()
        if self.is_main:
            old = self.final_dir.parent / f".old-{self.final_dir.name}"
            if self.final_dir.exists():
                os.replace(self.final_dir, old)
            os.replace(tmp, self.final_dir)
            shutil.rmtree(old, ignore_errors=True)

    def _config_dict(self) -> dict:
        return config_snapshot(self.cfg, RESUMABLE_KEYS)

    @property
    def config_path(self) -> Path:
        return Path(self.cfg.output_dir) / f"{self.stage}_config.json"

    def _check_same_config(self) -> None:
        """``output_dir`` holding a run (``{stage}_config.json``) started under another config is an error."""
        check_same_config(self.config_path, self._config_dict(), stage=self.stage,
                          hint="use another output_dir or resume=false")

    def _checkpoint(self, step: int) -> None:
        if self.fsdp:  # DCP: every rank writes its shards of the model and the AdamW state
            from fastrlhf.engine import checkpoint as dcp_ckpt
            dcp_ckpt.save_checkpoint(checkpoint_dir(self.out, step), models={"model": self.model},
                                     optimizers={"model": (self.model, self.optimizer)},
                                     state={"step": step, "scheduler": self.scheduler.state_dict()})
            dcp_ckpt.prune_checkpoints(self.out / CHECKPOINTS, self.cfg.keep_checkpoints)
            return
        with atomic_save_dir(checkpoint_dir(self.out, step)) as tmp:
            self.save_model(tmp)
            save_trainer_state(tmp, step=step, optimizer=self.optimizer, scheduler=self.scheduler)
        prune_checkpoints(self.out, self.cfg.keep_checkpoints)

    def _fresh(self) -> int:
        if self.is_main:
            truncate_metrics(self.out / "metrics.jsonl", stage=self.stage, after_step=0)
            write_config(self.config_path, self._config_dict())
        if self.runtime is not None:
            self.runtime.barrier()
        return 0

    def _resume_sharded(self) -> int:
        from fastrlhf.engine import checkpoint as dcp_ckpt
        ckpt = dcp_ckpt.latest_checkpoint(self.out / CHECKPOINTS)
        if ckpt is None:
            return self._fresh()
        state = dcp_ckpt.load_checkpoint(ckpt, models={"model": self.model},
                                         optimizers={"model": (self.model, self.optimizer)})
        self.scheduler.load_state_dict(state["scheduler"])
        if self.is_main:
            truncate_metrics(self.out / "metrics.jsonl", stage=self.stage, after_step=state["step"])
            print(f"[fastrlhf] {self.stage}: resuming from {ckpt} (step {state['step']} of {self.total_steps})")
        self.runtime.barrier()
        return int(state["step"])

    def _resume(self) -> int:
        if self.fsdp:
            return self._resume_sharded()
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return self._fresh()
        state = read_trainer_state(ckpt)
        self.load_model(ckpt)
        load_trainer_state(ckpt, optimizer=self.optimizer, scheduler=self.scheduler, state=state)
        truncate_metrics(self.out / "metrics.jsonl", stage=self.stage, after_step=state["step"])
        print(f"[fastrlhf] {self.stage}: resuming from {ckpt} (step {state['step']} of {self.total_steps})")
        return state["step"]


class MetricsLoggerLazy:
    """A ``MetricsLogger`` opened on first use, so a finished or failing run does not create files."""

    def __init__(self, out_dir: Path, *, tensorboard: bool, wandb: bool = False, enabled: bool = True):
        self.out_dir, self.tensorboard, self.wandb, self._logger = out_dir, tensorboard, wandb, None
        self.enabled = enabled

    def log(self, step: int, values: dict, *, stage: str) -> dict:
        if self._logger is None:
            self._logger = MetricsLogger(self.out_dir, tensorboard=self.tensorboard, wandb=self.wandb,
                                         enabled=self.enabled)
        return self._logger.log(step, values, stage=stage)

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()

"""Sharded checkpoints (``torch.distributed.checkpoint``) and the streamed HF-format export.

A checkpoint directory (written atomically: a temporary sibling renamed when every rank has written):

    step-00000010/
        __0_0.distcp, __1_0.distcp, ...   DCP shard files: one per rank, that rank's shards of every
                                          model and optimizer state (fp32 masters, Adam moments)
        .metadata                         DCP's index of the shards
        rng-rank0.json, rng-rank1.json    every RNG of each rank, as JSON
        trainer_state.json                step, world size and the trainer's bookkeeping (JSON); written
                                          last: its presence marks the checkpoint complete

No rank gathers a full model or optimizer state, and nothing is a pickle: DCP stores tensors with its own
metadata and the rest is JSON. A model with frozen and trained parameters (LoRA: frozen base, adapters and
heads) saves only the trained ones: resume rebuilds the frozen base from the same source.
``load_checkpoint`` restores in place into already-sharded models and optimizers at the same world size;
another world size is refused with a message (DCP could reshard the tensors, but the per-rank RNG streams
and data shards of the run would not match).

``export_hf`` writes the HF causal LM inside a (sharded) model as safetensors files of whole layers,
gathered one bucket at a time (``weight_sync.iter_weight_buckets``): rank 0 holds one bucket, never the
whole model. A LoRA model is exported merged (``W + (alpha/r) B A``, ``weight_sync.iter_merged_buckets``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastrlhf.utils import rng_state_json, set_rng_state_json

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _quiet_single_process():
    """DCP warns that it "assumes" a single process when there is no process group: that is the intent."""
    import warnings
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return _Exit(ctx)


class _Exit:
    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def _partly_frozen(model: nn.Module) -> bool:
    """Frozen and trained parameters (LoRA: a frozen base with adapters): only the trained ones are saved;
    resume rebuilds the frozen ones from the same source."""
    flags = {p.requires_grad for p in model.parameters()}
    return flags == {True, False}


def _model_options(model: nn.Module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # strict=False on load: the frozen keys are absent by design; every saved key must still be in the
    # checkpoint (dcp.load fails on a missing one)
    return StateDictOptions(ignore_frozen_params=True, strict=False) if _partly_frozen(model) else None


def _app_state(models: dict[str, nn.Module], optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]]):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {f"model.{k}": get_model_state_dict(m, options=_model_options(m))
             for k, m in models.items() if m is not None}
    state.update({f"optim.{k}": get_optimizer_state_dict(m, o) for k, (m, o) in optimizers.items()})
    return state


def save_checkpoint(directory: str | Path, *, models: dict[str, nn.Module],
                    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]], state: dict) -> Path:
    """Write a sharded checkpoint of ``models`` and ``optimizers`` ({name: (model, optimizer)}) plus the
    JSON-serialisable ``state`` (rank 0's) and every rank's RNG. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    final = Path(directory)
    rank, world = _rank_world()
    tmp = final.parent / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step
        tmp.mkdir(parents=True)
    _barrier()
    writer = FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1)
    with _quiet_single_process():
        dcp.save(_app_state(models, optimizers), storage_writer=writer)
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_state_json()))
    _barrier()
    if rank == 0:
        payload = {"world_size": world, **state}
        _write_json_atomic(tmp / STATE_FILE, _to_json(payload))
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write_json_atomic(path: Path, payload: dict) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def read_state(directory: str | Path) -> dict:
    return _from_json(json.loads((Path(directory) / STATE_FILE).read_text()))


def _to_json(value):
    """Small tensors in the trainer state (a 0-dim moment, a step count) as tagged JSON lists."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"__tensor__", "dtype"}:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def load_checkpoint(directory: str | Path, *, models: dict[str, nn.Module],
                    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
                    restore_rng: bool = True) -> dict:
    """Restore ``models`` / ``optimizers`` in place from :func:`save_checkpoint`'s ``directory`` (and this
    rank's RNG); returns the saved ``state``. Refuses a checkpoint written at another world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    directory = Path(directory)
    rank, world = _rank_world()
    state = read_state(directory)
    if state["world_size"] != world:
        raise RuntimeError(f"{directory} was written by {state['world_size']} ranks and this run has "
                           f"{world}; "
                           f"resume with --nproc_per_node {state['world_size']} or start a new output_dir")
    app = _app_state(models, optimizers)
    with _quiet_single_process():
        dcp.load(app, checkpoint_id=str(directory))
    for name, model in models.items():
        if model is not None:
            set_model_state_dict(model, app[f"model.{name}"], options=_model_options(model))
    for name, (model, opt) in optimizers.items():
        set_optimizer_state_dict(model, opt, app[f"optim.{name}"])
    if restore_rng:
        set_rng_state_json(json.loads((directory / f"rng-rank{rank}.json").read_text()))
    return state


def latest_checkpoint(root: str | Path, *, marker: str = STATE_FILE) -> Path | None:
    """The complete (``marker`` present: written last) ``step-N`` folder with the highest N under ``root``.
    ``marker``: ``trainer_state.json`` for DCP checkpoints; the single-process trainers' checkpoints end
    with ``trainer_state.pt`` (``trainers.common``)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if (m := _STEP_DIR.match(d.name)) and (d / marker).is_file()]
    return max(found)[1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step folders (rank 0 only; keep <= 0 keeps all)."""
    root = Path(root)
    if keep <= 0 or not root.is_dir() or _rank_world()[0] != 0:
        return
    found = sorted((int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)))
    for _, d in found[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------- HF export
def export_hf(model: nn.Module, directory: str | Path, *, tokenizer=None, bucket_mb: int = 512,
              dtype: torch.dtype | None = None) -> bool:
    """Save the HF causal LM inside ``model`` (plain, wrapped and/or FSDP2-sharded) so that
    ``AutoModelForCausalLM.from_pretrained(directory)`` loads it: config, generation config, one
    safetensors file per bucket of whole layers and ``model.safetensors.index.json``. Collective; rank 0
    writes; returns True there. Under a bf16 ``MixedPrecisionPolicy`` the gathered tensors are the bf16
    compute weights; pass ``dtype`` to cast."""
    from .fsdp import hf_model_prefix
    _, hf = hf_model_prefix(model)
    if not _write_buckets(model, directory, bucket_mb=bucket_mb, dtype=dtype):
        return False
    directory = Path(directory)
    hf.config.save_pretrained(directory)
    if getattr(hf, "generation_config", None) is not None and hf.can_generate():
        hf.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return True


def export_head_model(model: nn.Module, directory: str | Path, *, tokenizer=None, bucket_mb: float = 512) -> bool:
    """Save a head model (``RewardModel``, ``ValueModel``, ``MultiHeadRewardModel``; plain or FSDP2-sharded)
    as the folder its ``from_pretrained`` (and ``load_head_model``) loads: backbone config,
    ``fastrlhf_head.json``, safetensors files of whole layers gathered one bucket at a time (as
    :func:`export_hf`: rank 0 never holds the whole model) with their index. Collective; rank 0 writes;
    returns True there."""
    names = [(n, n) for n, _ in model.named_parameters()]  # body.* and head.*: the checkpoint's keys
    if not _write_buckets(model, directory, bucket_mb=bucket_mb, names=names, buffers=True):
        return False
    model.save_metadata(directory, tokenizer=tokenizer)
    return True


def _write_buckets(model: nn.Module, directory: str | Path, *, bucket_mb: float, dtype: torch.dtype | None = None,
                   names: list[tuple[str, str]] | None = None, buffers: bool = False) -> bool:
    """The weights of ``model`` (``names``: default the HF causal LM's, ``weight_sync.policy_parameters``)
    as ``model-0000i-of-0000N.safetensors`` files of whole layers plus ``model.safetensors.index.json``,
    one gathered bucket at a time (``weight_sync.iter_weight_buckets``). ``buffers``: the persistent
    buffers (replicated, never sharded) go into the last file. Collective; rank 0 writes and returns True."""
    from safetensors.torch import save_file

    from fastrlhf.models.lora import has_lora

    from .weight_sync import iter_merged_buckets, iter_weight_buckets
    rank, _ = _rank_world()
    directory = Path(directory)
    files: list[tuple[str, list[str]]] = []

    def write(tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(directory / name),
                  metadata={"format": "pt"})
        files.append((name, list(tensors)))

    buckets = iter_merged_buckets if has_lora(model) else iter_weight_buckets  # LoRA: W + (alpha/r) B A
    for bucket in buckets(model, max(1, int(bucket_mb * 2**20)), dtype=dtype, named=names):
        if rank == 0:
            write(dict(bucket))
    if rank != 0:
        return False
    if buffers:
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        extra = {k: v for k, v in model.state_dict().items() if k not in params}
        if extra:
            write(extra)
    total = len(files)
    weight_map = {}
    for i, (name, keys) in enumerate(files):
        new = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(directory / name, directory / new)
        weight_map.update({k: new for k in keys})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return True

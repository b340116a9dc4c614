"""Process-group set-up for SPMD runs under ``torchrun`` (one process per GPU, or per CPU worker).

The process group must exist before any vLLM engine is created: an in-process vLLM engine started
first initialises a torch.distributed world of its own (size 1), and with
``distributed_executor_backend="external_launcher"`` and no group it fails (measured, ../shared/ENV.md).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    fsdp: bool = False  # models go through FSDP2 (``use_fsdp``)


FSDP_ENV = "FASTRLHF_FSDP"  # "1": FSDP2 even in one CPU process (a 1-rank gloo group); "0": plain modules


def fsdp_override(value: bool | None = None) -> bool | None:
    """``value`` when given, else ``$FASTRLHF_FSDP`` ("1"/"0"; unset or empty: None, the default rule)."""
    if value is not None:
        return value
    env = os.environ.get(FSDP_ENV, "").strip()
    if env in ("", "auto"):
        return None
    if env not in ("0", "1"):
        raise ValueError(f"{FSDP_ENV} must be 0, 1 or unset, got {env!r}")
    return env == "1"


def use_fsdp(device: torch.device, world_size: int, force: bool | None = None) -> bool:
    """Whether models go through FSDP2: whenever there is a process group of several ranks or a GPU
    (FSDP2 on one GPU is how mixed precision and offload stay one code path); plain modules only in a
    single CPU process. ``force`` (``fsdp_override``) decides instead when not None; several ranks
    always shard."""
    if world_size > 1:
        return True
    if force is not None:
        return force
    return torch.device(device).type == "cuda"


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise ValueError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from e


def init_distributed(device: str | None = None, *, fsdp: bool | None = None) -> DistInfo:
    """Initialise the default process group when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA with
    the ``LOCAL_RANK`` device) and return this process's place in it. Idempotent.

    ``device``: "cpu", "cuda" or None (CUDA when available). A single process gets a 1-rank group when
    :func:`use_fsdp` says FSDP2 (on a GPU, or forced by ``fsdp`` / ``$FASTRLHF_FSDP``): an in-process
    ``HashStore`` (no port, no file: nothing a later torchrun or vLLM could clash with); an in-process
    vLLM engine created afterwards finds this world of 1 and uses it. Plain modules: no group.
    """
    rank, world, local_rank = env_world()
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if use_cuda:
        index = local_rank if world > 1 else (torch.device(device).index if device else None)
        dev = torch.device("cuda", index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    shard = use_fsdp(dev, world, fsdp_override(fsdp))
    if shard and not dist.is_initialized():  # one process, FSDP2: a world of 1
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                **({"device_id": dev} if use_cuda else {}))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                    fsdp=use_fsdp(dev, world, fsdp_override(fsdp)))


def free_port() -> int:
    """A free TCP port on localhost (for tests that start their own process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

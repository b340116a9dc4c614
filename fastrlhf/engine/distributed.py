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


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise ValueError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from e


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise the default process group when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA with
    the ``LOCAL_RANK`` device) and return this process's place in it. Idempotent.

    ``device``: "cpu", "cuda" or None (CUDA when available). A single process gets no process group.
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
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def free_port() -> int:
    """A free TCP port on localhost (for tests that start their own process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""What stands between a user and a bad run: the output folder's lock, model-folder checks, CPU threads,
and the ``fastrlhf sft|rm`` entry point that applies them before anything is loaded.

A run holds ``output_dir/.fastrlhf.lock`` (pid and host): a second run into the same folder is refused,
a lock left by a process that is gone is taken over, and a folder created by a run that then fails
while it holds only records (config, metrics, lock) is removed again.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from fastrlhf.config import ConfigError
from fastrlhf.trainers.common import pick_device


def check_model_dir(key: str, value: str | None, *, needs: tuple[str, ...] = ("config.json",)) -> None:
    """A config key naming a local model folder: it must exist and hold ``needs`` (an empty or half-copied
    folder otherwise ends deep inside transformers, e.g. asking to install sentencepiece). Hub names
    (no such local path, not starting with ``.``, ``/`` or ``~``) are left to the hub."""
    if not value:
        return
    path = Path(value).expanduser()
    if not path.exists():
        if value.startswith((".", "/", "~")):
            raise ConfigError(f"{key}: {value} does not exist")
        return
    if not path.is_dir():
        raise ConfigError(f"{key}: {value} is not a model folder")
    missing = [n for n in needs if not (path / n).is_file()]
    if missing:
        raise ConfigError(f"{key}: {value} is not a saved model folder ({', '.join(missing)} missing)")


def pin_threads(num_threads: int, device: torch.device | str) -> None:
    """CPU runs use ``num_threads`` torch threads (0: leave torch's default). Small models on a shared CPU
    run many times slower with one OpenMP thread per core spin-waiting next to a busy process."""
    if num_threads > 0 and torch.device(device).type == "cpu":
        torch.set_num_threads(num_threads)


LOCK_FILE = ".fastrlhf.lock"
# What a run writes before it has anything to keep (no checkpoint, no model): a failed start removes them.
_RECORDS = {LOCK_FILE, "sft_config.json", "rm_config.json", "ppo_config.json", "demo_run.json",
            "metrics.jsonl", "tensorboard", "eval_samples.jsonl"}


def _only_records(out: Path) -> bool:
    try:
        return all(p.name in _RECORDS for p in out.iterdir())
    except OSError:
        return False


def _lock_holder(path: Path) -> tuple[int, str] | None:
    try:
        pid, _, host = path.read_text().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path, *, enabled: bool = True) -> Iterator[Path]:
    """Hold ``output_dir/.fastrlhf.lock`` (this pid and host) for a run: a second run into the same
    folder is refused with ``ConfigError``; a lock left by a dead process on this host is taken over.
    A folder this call created is removed again when the run fails while it holds only records (config,
    metrics, lock; no checkpoint, model or stage folder): a user error leaves nothing behind.
    ``enabled=False`` (ranks other than 0): no-op."""
    out = Path(output_dir)
    if not enabled:
        yield out
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"output_dir {out} exists and is not a folder") from None
    except OSError as err:
        raise ConfigError(f"output_dir {out} cannot be created ({err.strerror})") from None
    if not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    path, me = out / LOCK_FILE, f"{os.getpid()} {os.uname().nodename}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and holder[1] != os.uname().nodename:
                raise ConfigError(f"output_dir {out} is in use by pid {holder[0]} on host {holder[1]} "
                                  f"(lock file {path}; delete it if that run is gone)") from None
            if holder is not None and _alive(holder[0]) and holder[0] != os.getpid():
                raise ConfigError(f"output_dir {out} is in use by another run (pid {holder[0]}, lock file "
                                  f"{path}); wait for it to finish or use another output_dir") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its process is gone
            continue
        except OSError as err:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise ConfigError(f"output_dir {out} is not writable ({err.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    else:
        raise ConfigError(f"output_dir {out}: could not take the lock file {path}")
    ok = False
    try:
        yield out
        ok = True
    finally:
        if _lock_holder(path) == (os.getpid(), os.uname().nodename):
            with contextlib.suppress(OSError):
                path.unlink()
        if not ok and created and _only_records(out):
            shutil.rmtree(out, ignore_errors=True)


def stage_cli(config_cls, trainer_cls, config_path: str, overrides) -> int:
    """``fastrlhf sft|rm --config FILE [key=value ...]``: the config is read and checked (keys, values,
    model folder, device) before anything is loaded; the run holds ``output_dir``'s lock; CPU threads
    are pinned (``num_threads``); one closing line."""
    from fastrlhf.config import load_config

    cfg = load_config(config_cls, config_path, overrides)
    check_model_dir("model", cfg.model)
    device = pick_device(cfg.device)
    stage = trainer_cls.stage
    with output_dir_lock(cfg.output_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        pin_threads(cfg.num_threads, device)
        result = trainer_cls(cfg).train()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one closing line (rank 0 writes the files)
        print(f"[fastrlhf] {stage} done: {Path(cfg.output_dir) / 'final'}  {result}", flush=True)
    return 0

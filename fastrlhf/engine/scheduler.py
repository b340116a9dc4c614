"""Phase scheduling around one PPO iteration: GENERATE -> SCORE -> TRAIN -> SYNC.

``PhaseScheduler.phase(name)`` is a state machine: a phase may only follow the one whose results it
consumes (SCORE needs a GENERATE, TRAIN a SCORE, SYNC a TRAIN, the start, or a SCORE whose step was
skipped); GENERATE begins an
iteration from any state (a skipped step abandons the rest of its iteration). Out-of-order use raises
:class:`PhaseError`. Every phase's wall time and peak memory go to ``pop_stats()``
(CUDA: ``mem/<phase>_peak_mb`` reserved by PyTorch's allocator, ``mem/<phase>_peak_alloc_mb`` allocated;
host: RSS).

With a memory plan bound (:meth:`bind`), entering a phase applies it (the hybrid engine's time-sharing):

    GENERATE   offload what the plan offloads for generation (optimizer state, ...), empty PyTorch's
               CUDA cache, wake the vLLM engine
    SCORE      vLLM to sleep (``rollout.sleep_level``: 1 weights to host, 2 weights discarded; KV cache
               freed); onload the scoring models, except those the plan marks "sequential": the trainer
               scores model by model and each of those is onloaded for its own turn only (:meth:`onloaded`)
    TRAIN      vLLM asleep; onload actor/critic and their optimizer state, offload the frozen models
    SYNC       empty PyTorch's CUDA cache, wake only vLLM's weights (the sync overwrites them; after
               level 2 the engine restores its buffers when the sync ends); actor parameters resident

Without a plan (the single-process HF path) phases are only checked and timed.
"""
from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator

import torch

from .memory import PHASES, MemoryPlan

# phase -> the states it may follow (None: nothing run yet)
_ALLOWED_AFTER = {
    "generate": None,  # any state
    "score": ("generate", "score"),
    "train": ("score", "train"),
    "sync": (None, "score", "train", "sync"),  # after SCORE: a skipped step refills a level-2 engine
}


class PhaseError(RuntimeError):
    """A phase entered out of order (e.g. TRAIN before SCORE of the same batch) or nested."""


class PhaseScheduler:
    """``with sched.phase("generate"): ...``; ``sched.pop_stats()`` -> {"time/generate_s": ..., ...}."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._stats: dict[str, float] = {}
        self.last: str | None = None      # the last phase entered
        self.current: str | None = None   # the phase running now (None between phases)
        self.plan: MemoryPlan | None = None
        self._plan_logged = False
        self._models: dict[str, torch.nn.Module] = {}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._rollout = None
        self.placement: dict[str, str] = {}  # item -> "device" | "cpu" (what the hooks last did)
        self.events: list[tuple[str, str]] = []  # (phase, action) log of hook actions, for tests

    # ------------------------------------------------------------------------------------ binding
    def bind(self, *, plan: MemoryPlan | None = None, models: dict | None = None, rollout=None) -> None:
        """Attach a memory plan, models ({"actor", "critic", "ref", "reward"}) and/or a rollout engine."""
        if plan is not None:
            self.plan, self._plan_logged = plan, False
        for name, model in (models or {}).items():
            if model is not None:
                self._models[name] = model
                self.placement.setdefault(f"{name}.params", "device")
        if rollout is not None:
            self._rollout = rollout

    def register_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Let the plan offload ``name``'s optimizer state ("actor" or "critic")."""
        self._optimizers[name] = optimizer
        self.placement.setdefault(f"{name}.optim", "device")

    # ---------------------------------------------------------------------------------- the phases
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._check_transition(name)
        self.current, self.last = name, name
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()  # the phase's time includes its offload / onload / wake work
        try:
            self._apply_plan(name)
            yield
        finally:
            self.current = None
            if cuda:
                torch.cuda.synchronize(self.device)
                # reserved (what the caching allocator holds: what vLLM and the next phase cannot use), and
                # allocated (what tensors use) next to it
                self._stats[f"mem/{name}_peak_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
                self._stats[f"mem/{name}_peak_alloc_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            else:
                # Host: resident set size now and the process's peak so far (no per-phase peak on CPU).
                self._stats[f"mem/{name}_rss_mb"] = _rss_mb()
                self._stats["mem/peak_rss_mb"] = _max_rss_mb()
            elapsed = time.perf_counter() - start
            self._stats[f"time/{name}_s"] = self._stats.get(f"time/{name}_s", 0.0) + elapsed

    def _check_transition(self, name: str) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        if self.current is not None:
            raise PhaseError(f"phase {name!r} entered inside phase {self.current!r}; phases do not nest")
        allowed = _ALLOWED_AFTER[name]
        if allowed is not None and self.last not in allowed:
            after = "the start" if self.last is None else repr(self.last)
            need = " or ".join("the start" if a is None else repr(a) for a in allowed)
            raise PhaseError(f"phase {name!r} cannot follow {after}: it must follow {need} "
                             f"(order: generate -> score -> train -> sync)")

    @contextlib.contextmanager
    def onloaded(self, name: str) -> Iterator[None]:
        """Inside: model ``name``'s parameters on the device. A model the plan marks "sequential" in the
        current phase (SCORE with the frozen models onloaded one at a time) is onloaded on entry, before
        the caller's first forward (so before FSDP2's pre-forward all-gather, which must find its shards on
        the device), and offloaded on exit: run all of its micro-batches inside, and it crosses once per
        phase instead of twice per micro-batch. Any other model: nothing to do."""
        item = f"{name}.params"
        phase = self.current
        moves = (self.plan is not None and phase is not None and item in self.placement
                 and self.plan.where(phase, item) == "sequential")
        if moves:
            self._place(phase, item, "device")
        try:
            yield
        finally:
            if moves:
                self._place(phase, item, "cpu")

    def pop_stats(self) -> dict[str, float]:
        """Phase times and memory since the last call; the memory plan's numbers on the first call."""
        stats, self._stats = self._stats, {}
        if self.plan is not None and not self._plan_logged:
            stats.update(self.plan.flat_metrics())
            self._plan_logged = True
        return stats

    def plan_dict(self) -> dict | None:
        """The memory plan as a JSON-ready dict (for ``summary.json``), or None without a plan."""
        return None if self.plan is None else self.plan.as_dict()

    # -------------------------------------------------------------------------------------- hooks
    def _apply_plan(self, phase: str) -> None:
        """The hand-over between trainer and engine, in an order that never holds both at once:

            SCORE / TRAIN    engine to sleep (its level), then offload / onload trainer state
            GENERATE / SYNC  offload trainer state the plan moves out, release PyTorch's cached blocks
                             (``torch.cuda.empty_cache``, CUDA only: vLLM allocates outside PyTorch's
                             cache and cannot reuse them), then wake the engine (SYNC: weights only),
                             then onload what the plan keeps resident

        Engine sleep level 0 keeps it awake throughout (no sleep / wake calls)."""
        rollout = self._rollout if self.plan is not None else None
        sleeps = rollout is not None and getattr(rollout, "sleep_level", 1) > 0
        targets = {}
        if self.plan is not None:
            targets = {item: self.plan.where(phase, item) for item in self.placement}
        offload = [item for item, where in targets.items() if where != "resident"]
        onload = [item for item, where in targets.items() if where == "resident"]
        if phase in ("generate", "sync"):
            for item in offload:
                self._place(phase, item, "cpu")
            if sleeps:
                self._act(phase, "empty_cache", self._empty_cache)
                if phase == "generate":
                    self._act(phase, "wake", rollout.wake)
                else:
                    self._act(phase, "wake_weights", lambda: rollout.wake(tags=["weights"]))
        else:
            if sleeps:
                self._act(phase, "sleep", lambda: rollout.sleep(level=getattr(rollout, "sleep_level", 1)))
            for item in offload:
                self._place(phase, item, "cpu")
        for item in onload:
            self._place(phase, item, "device")

    def _empty_cache(self) -> None:
        """Give PyTorch's cached, unallocated blocks back to the driver (CUDA only; a no-op elsewhere)."""
        if self.device.type == "cuda":
            import gc
            gc.collect()  # tensors of the phase that just ended, kept alive only by reference cycles
            torch.cuda.empty_cache()

    def _place(self, phase: str, item: str, where: str) -> None:
        if self.placement.get(item) == where:
            return
        name, kind = item.split(".")
        device = self.device if where == "device" else torch.device("cpu")
        from .fsdp import move_model, move_optimizer
        if kind == "params":
            self._act(phase, f"{where}:{item}", lambda: move_model(self._models[name], device))
        else:
            self._act(phase, f"{where}:{item}", lambda: move_optimizer(self._optimizers[name], device))
        self.placement[item] = where

    def _act(self, phase: str, action: str, fn) -> None:
        self.events.append((phase, action))
        fn()


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB

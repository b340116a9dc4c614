"""The phase state machine, the scheduler's placement from the planner, and the plan's hooks."""
from __future__ import annotations

import pytest
import torch

import dataclasses
from pathlib import Path

from fastrlhf.engine.memory import PHASES, MemoryPlan, MemoryPlanError
from fastrlhf.engine.planner import GiB, PlanSpec, load_arch, plan_ppo, scheduler_plan
from fastrlhf.engine.runtime import Runtime, prepare_models
from fastrlhf.engine.scheduler import PhaseError, PhaseScheduler
from fastrlhf.models import tiny_llama

MB = 2**20


def run(sched, *phases):
    for p in phases:
        with sched.phase(p):
            pass


def test_phase_order_is_enforced():
    s = PhaseScheduler("cpu")
    run(s, "generate", "score", "score", "train", "train", "sync", "generate", "score", "train",
        "generate")  # HF backend: no SYNC; a new iteration may start after any phase
    run(s, "generate")  # a skipped step: the next iteration starts again
    with pytest.raises(PhaseError, match="'train' cannot follow 'generate'"):
        run(s, "train")
    with pytest.raises(PhaseError, match="'sync' cannot follow 'generate'"):
        run(PhaseScheduler("cpu"), "generate", "sync")
    with pytest.raises(PhaseError, match="'score' cannot follow the start"):
        run(PhaseScheduler("cpu"), "score")
    run(PhaseScheduler("cpu"), "sync", "generate")  # the first sync fills a fresh engine
    with pytest.raises(ValueError, match="unknown phase 'rollout'"):
        run(s, "rollout")


def test_phases_do_not_nest_and_state_recovers_from_errors():
    s = PhaseScheduler("cpu")
    with pytest.raises(PhaseError, match="inside phase 'generate'"):
        with s.phase("generate"):
            run(s, "score")
    assert s.current is None
    with pytest.raises(KeyError):
        with s.phase("score"):
            raise KeyError("boom")
    assert s.current is None and s.last == "score"
    run(s, "train")


def test_stats_accumulate_time_and_memory():
    s = PhaseScheduler("cpu")
    run(s, "generate", "score", "score")
    stats = s.pop_stats()
    assert {"time/generate_s", "time/score_s", "mem/generate_rss_mb", "mem/peak_rss_mb"} <= set(stats)
    assert all(v >= 0 for v in stats.values())
    assert s.pop_stats() == {}


QWEN7B = Path(__file__).resolve().parents[2] / "examples" / "configs" / "qwen2.5-7b"


@pytest.fixture(scope="module")
def qwen7b():
    return load_arch(str(QWEN7B))


def _placed(arch, offload, **kw):
    base = dict(actor=arch, gpus=8, precision="bf16", offload=offload, packing=True, gradient_checkpointing=True,
                max_tokens_per_micro_batch=8192, prompt_len=1024, response_len=1024, vllm=True,
                gpu_memory_utilization=0.4)
    spec = PlanSpec(**{**base, **kw})
    plan = plan_ppo(spec)
    return plan, scheduler_plan(plan, device="cuda:0")


def _column(mp, item):
    return [mp.placement[p][item] for p in PHASES]


def test_scheduler_plan_bytes_and_engine_items_from_the_planner(qwen7b):
    plan, mp = _placed(qwen7b, "none")
    n = qwen7b.numel
    assert mp.bytes["actor.params"] == -(-4 * n // 8)  # fp32 masters over 8 ranks
    assert mp.bytes["actor.optim"] == -(-4 * n // 8) + -(-8 * n // 8)  # fp32 grads + Adam moments
    assert mp.bytes["ref.params"] == -(-2 * n // 8)  # frozen in bf16
    assert mp.bytes["vllm.weights"] == 2 * n and mp.bytes["vllm.kv"] == int(0.4 * 80 * GiB) - 2 * n
    assert mp.predicted == {p: plan.phases[p].total for p in PHASES} and mp.offload == "none"
    # offload=none: every model's state stays; the engine sleeps in SCORE / TRAIN, weights wake for SYNC
    assert {w for ph in mp.placement.values() for k, w in ph.items() if "vllm" not in k} == {"resident"}
    assert _column(mp, "vllm.kv") == ["resident", "offloaded", "offloaded", "offloaded"]
    assert _column(mp, "vllm.weights") == ["resident", "offloaded", "offloaded", "resident"]
    flat = mp.flat_metrics()
    assert flat["plan/train_predicted_mb"] == pytest.approx(plan.phases["train"].total / 2**20, abs=0.01)
    assert "does not fit" not in mp.format() and mp.format().splitlines()[-1].startswith("fits")


def test_scheduler_plan_follows_each_offload_level(qwen7b):
    _, mp = _placed(qwen7b, "optimizer")
    assert _column(mp, "actor.optim") == ["offloaded", "offloaded", "resident", "offloaded"]
    assert _column(mp, "actor.params") == ["resident"] * 4
    _, mp = _placed(qwen7b, "params")  # parameters only where used; SCORE model by model
    assert _column(mp, "actor.params") == ["offloaded", "sequential", "resident", "resident"]
    assert _column(mp, "ref.params") == ["offloaded", "sequential", "offloaded", "offloaded"]
    assert _column(mp, "critic.optim") == ["offloaded", "offloaded", "resident", "offloaded"]
    assert any("model by model" in note for note in mp.notes)
    _, mp = _placed(qwen7b, "all")  # trained state under CPUOffloadPolicy: FSDP2 moves it, not the scheduler
    assert _column(mp, "actor.params") == _column(mp, "critic.optim") == ["host"] * 4
    assert mp.flat_metrics()["plan/train/actor.params"] == 0.0 and " H " in mp.format()
    assert _column(mp, "reward.params") == ["offloaded", "sequential", "offloaded", "offloaded"]
    assert any("CPUOffloadPolicy" in note for note in mp.notes)
    auto, mp = _placed(qwen7b, "auto")
    assert auto.offload == mp.offload == "none" and "chosen by the planner" in mp.notes[0]


def test_scheduler_plan_with_an_engine_that_never_sleeps(qwen7b):
    plan, mp = _placed(qwen7b, "none", vllm_sleeps=False)
    assert all(mp.placement[p][k] == "resident" for p in PHASES for k in ("vllm.weights", "vllm.kv"))
    asleep, _ = _placed(qwen7b, "none")
    engine = int(0.4 * 80 * GiB)
    for p in ("score", "train"):  # the engine's share is counted in every phase when it never sleeps
        assert plan.phases[p].items["vllm"] == engine and "vllm" not in asleep.phases[p].items
        assert plan.phases[p].total == asleep.phases[p].total + engine


def test_scheduler_plan_without_critic_ref_or_reward_model(qwen7b):
    _, mp = _placed(qwen7b, "none", with_critic=False, with_reward_model=False)  # GRPO + reward functions
    assert sorted(k for k in mp.bytes if not k.startswith("vllm")) == ["actor.optim", "actor.params", "ref.params"]
    _, mp = _placed(qwen7b, "none", lora_rank=16)  # LoRA: the reference is the actor without adapters
    assert "ref.params" not in mp.bytes
    assert mp.bytes["actor.optim"] < mp.bytes["actor.params"] / 20  # adapters only


def test_plan_counts_the_gathered_actor_in_hf_generate_under_fsdp(qwen7b):
    """HF rollout of an FSDP2 actor all-gathers the whole actor for GENERATE (``rollout.hf.gathered``): the
    plan holds it there, in the compute dtype, on top of the shards; with vLLM there is no such item."""
    hf, _ = _placed(qwen7b, "none", vllm=False)
    assert hf.phases["generate"].items["actor.gathered"] == 2 * qwen7b.numel
    assert all("actor.gathered" not in hf.phases[p].items for p in ("score", "train", "sync"))
    vllm, _ = _placed(qwen7b, "none")
    assert "actor.gathered" not in vllm.phases["generate"].items


def test_plan_before_loading_refuses_what_does_not_fit(tmp_path, monkeypatch):
    """The trainer plans from the config.json files before any weight is read: on a GPU too small it stops
    with the planner's table and suggestions; on a big one it returns the level "auto" picks. CUDA's
    device query is faked (no GPU here); nothing else touches the device."""
    from types import SimpleNamespace

    from fastrlhf.engine.runtime import plan_before_loading
    from fastrlhf.trainers.ppo import PPOConfig, RolloutConfig
    gib = {"total": 12}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(total_memory=gib["total"] * GiB))
    cfg = PPOConfig(model=str(QWEN7B), reward_model=str(QWEN7B), precision="bf16", max_prompt_length=1024,
                    max_tokens_per_micro_batch=8192, rollout=RolloutConfig(backend="vllm", max_new_tokens=1024))
    rt = Runtime(device=torch.device("cuda:0"), world_size=8)
    with pytest.raises(MemoryPlanError, match=r"do not fit cuda:0(.|\n)*\ndoes not fit: TRAIN needs"):
        plan_before_loading(rt, cfg, fsdp=True, critic=True, ref=True)
    gib["total"] = 80  # without checkpointing TRAIN's activations need parameters offloaded between phases
    assert plan_before_loading(rt, cfg, fsdp=True, critic=True, ref=True) == "params"
    assert plan_before_loading(rt, cfg, fsdp=False, critic=True, ref=True) == "params"  # plain modules: no "all"
    with pytest.raises(MemoryPlanError, match="offload=none"):  # a level the config sets is kept, or refused
        plan_before_loading(rt, dataclasses.replace(cfg, offload="none"), fsdp=True, critic=True, ref=True)
    checkpointed = dataclasses.replace(cfg, offload="none", gradient_checkpointing=True)
    assert plan_before_loading(rt, checkpointed, fsdp=True, critic=True, ref=True) == "none"
    with pytest.raises(MemoryPlanError, match="offload=all needs the models sharded with FSDP2"):
        plan_before_loading(rt, dataclasses.replace(cfg, offload="all"), fsdp=False, critic=True, ref=True)


def test_cpu_plan_is_all_resident_and_hooks_move_nothing():
    rt = Runtime(device=torch.device("cpu"))
    actor, critic, ref, rm = (tiny_llama(64, seed=i) for i in range(4))
    actor, critic, ref, rm = prepare_models(rt, actor=actor, critic=critic, ref=ref, reward_model=rm)
    assert not any(p.requires_grad for p in ref.parameters())
    # the plan sizes the actor from its config: fp32 parameters, and grads + Adam for every one of them
    numel = sum(p.numel() for p in actor.parameters())
    assert rt.scheduler.plan.bytes["actor.params"] == 4 * numel
    assert rt.scheduler.plan.bytes["actor.optim"] == (4 + 8) * numel
    run(rt.scheduler, "generate", "score", "train", "sync")
    assert rt.scheduler.events == []
    assert rt.scheduler.pop_stats()["plan/train/ref.params"] == 1.0


def test_plan_hooks_offload_and_onload_real_models():
    """A fake budget that forces offloading: the hooks move the real models and optimizer state."""
    sched = PhaseScheduler("cpu")
    actor, ref = tiny_llama(64, seed=0), tiny_llama(64, seed=1)
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-3)
    actor(torch.randint(0, 64, (2, 5))).logits.sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    # TRAIN holds actor params + optim and no ref; SCORE both params, no optimizer state
    plan = _hand_plan(["actor.params", "actor.optim", "ref.params"],
                      offloaded={"train": ["ref.params"], "score": ["actor.optim"]})
    sched.bind(plan=plan, models={"actor": actor, "ref": ref})
    sched.register_optimizer("actor", opt)
    run(sched, "generate", "score", "train")
    actions = [a for _, a in sched.events]
    assert "cpu:actor.optim" in actions and "device:actor.optim" in actions and "cpu:ref.params" in actions
    # offloads happen before onloads within a phase
    train = [a for p, a in sched.events if p == "train"]
    assert train == sorted(train, key=lambda a: a.startswith("device"))
    assert all(torch.equal(before[k], v) for k, v in actor.state_dict().items())
    assert all(t.device.type == "cpu" for s in opt.state.values() for t in s.values())


def _hand_plan(items, offloaded):
    """A placement written by hand (the scheduler's mechanics, apart from the planner's choices)."""
    placement = {p: {i: "offloaded" if i in offloaded.get(p, ()) else "resident" for i in items} for p in PHASES}
    return MemoryPlan("cpu", 1, dict.fromkeys(items, 1), placement)


class RecordingRollout:
    """Records sleep / wake into the scheduler's own event log, so one list shows the whole order."""

    def __init__(self, events, sleep_level):
        self.events, self.sleep_level = events, sleep_level

    def sleep(self, level):
        self.events.append(("engine", f"sleep({level})"))

    def wake(self, tags=None):
        self.events.append(("engine", "wake" if tags is None else f"wake({','.join(tags)})"))


def _handover_scheduler(sleep_level):
    """A hand-written plan that offloads the actor's optimizer state for GENERATE and SYNC."""
    sched = PhaseScheduler("cpu")
    actor = tiny_llama(64, seed=0)
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-3)
    actor(torch.randint(0, 64, (2, 5))).logits.sum().backward()
    opt.step()
    plan = _hand_plan(["actor.params", "actor.optim", "vllm.weights", "vllm.kv"],
                      offloaded={"generate": ["actor.optim"], "sync": ["actor.optim", "vllm.kv"],
                                 "score": ["vllm.weights", "vllm.kv"], "train": ["vllm.weights", "vllm.kv"]})
    sched.bind(plan=plan, models={"actor": actor}, rollout=RecordingRollout(sched.events, sleep_level))
    sched.register_optimizer("actor", opt)
    return sched


@pytest.mark.parametrize("level", [1, 2])
def test_handover_order_offload_then_empty_cache_then_wake(level):
    """GENERATE / SYNC: trainer state out, PyTorch's cache emptied, then the engine wakes (SYNC: weights
    only), then what the plan keeps resident comes back; SCORE / TRAIN: the engine sleeps (at its
    level) before trainer state comes back."""
    sched = _handover_scheduler(level)
    run(sched, "sync", "generate", "score", "train", "sync", "generate")
    ev = sched.events
    by_phase = []  # [phase, actions of the scheduler and of the engine in that phase]
    for phase, action in ev:
        if phase != "engine" and (not by_phase or by_phase[-1][0] != phase):
            by_phase.append([phase, []])
        by_phase[-1][1].append(action)
    phases = [p for p, _ in by_phase]
    assert phases == ["sync", "generate", "score", "train", "sync", "generate"]
    first_sync, gen, score, train, sync, gen2 = (a for _, a in by_phase)
    assert first_sync == ["cpu:actor.optim", "empty_cache", "wake_weights", "wake(weights)"]
    assert gen == gen2 == ["empty_cache", "wake", "wake"]  # the scheduler's event, then the engine's call
    assert score == ["sleep", f"sleep({level})", "device:actor.optim"]  # asleep before the optimizer returns
    assert train == ["sleep", f"sleep({level})"]  # (the engine ignores a second sleep)
    assert sync == ["cpu:actor.optim", "empty_cache", "wake_weights", "wake(weights)"]


def test_sleep_level_0_never_sleeps_or_wakes():
    sched = _handover_scheduler(0)
    run(sched, "sync", "generate", "score", "train", "sync")
    assert not [a for _, a in sched.events if "sleep" in a or "wake" in a or a == "empty_cache"]


def test_empty_cache_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    PhaseScheduler("cpu")._empty_cache()
    assert calls == []
    PhaseScheduler("cuda:0")._empty_cache()  # guarded by the device, not by torch.cuda.is_available()
    assert calls == ["cuda"]


def test_phase_peak_on_cuda_is_reserved_memory(monkeypatch):
    """The per-phase peak on CUDA is what PyTorch's allocator reserved (what vLLM and the next phase cannot
    use), with the allocated peak next to it; CPU keeps its RSS figures. CUDA calls faked: no GPU here."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 300 * MB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 120 * MB)
    s = PhaseScheduler(torch.device("cuda"))
    run(s, "generate")
    stats = s.pop_stats()
    assert stats["mem/generate_peak_mb"] == 300.0
    assert stats["mem/generate_peak_alloc_mb"] == 120.0
    assert calls == ["reset"]
    assert not any("rss" in k for k in stats)
    cpu = PhaseScheduler("cpu")
    run(cpu, "generate")
    cpu_stats = cpu.pop_stats()
    assert "mem/generate_rss_mb" in cpu_stats and "mem/peak_rss_mb" in cpu_stats
    assert not any("peak_alloc" in k or k == "mem/generate_peak_mb" for k in cpu_stats)


def test_host_items_are_left_to_fsdp2():
    """offload=all: the trained state is on the host under CPUOffloadPolicy ("host"); the scheduler never
    moves it, while a frozen model's "offloaded" / "sequential" placement still moves."""
    sched = PhaseScheduler("cpu")
    actor, ref = tiny_llama(64, seed=0), tiny_llama(64, seed=1)
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-3)
    items = ["actor.params", "actor.optim", "ref.params"]
    placement = {p: {"actor.params": "host", "actor.optim": "host",
                     "ref.params": "sequential" if p == "score" else "offloaded"} for p in PHASES}
    sched.bind(plan=MemoryPlan("cuda:0", 1, dict.fromkeys(items, 1), placement), models={"actor": actor, "ref": ref})
    sched.register_optimizer("actor", opt)
    run(sched, "generate", "score", "train", "sync")
    actions = [a for _, a in sched.events]
    assert actions == ["cpu:ref.params"]  # once, in GENERATE; nothing for the actor in any phase

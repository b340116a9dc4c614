"""The phase state machine, the memory-plan arithmetic on a fake device budget, and the plan's hooks."""
from __future__ import annotations

import pytest
import torch

from fastrlhf.engine.memory import MemoryPlanError, ModelSize, item_bytes, model_size, plan_memory
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


def test_item_bytes_arithmetic():
    sizes = {"actor": ModelSize(1000, 4, trained=True), "critic": ModelSize(500, 4, trained=True),
             "ref": ModelSize(1000, 2), "reward": None}
    b = item_bytes(sizes, world_size=4, has_vllm=True, vllm_param_bytes=2, vllm_kv_bytes=777, tp=2)
    assert b == {"actor.params": 1000, "actor.optim": 3000,  # 4 B params; 4 B grads + 8 B Adam, / 4 ranks
                 "critic.params": 500, "critic.optim": 1500, "ref.params": 500,
                 "vllm.weights": 1000, "vllm.kv": 777}  # the engine's bf16 copy split over tp=2


def _sizes(n):
    return {"actor": ModelSize(n, 4, trained=True), "critic": ModelSize(n, 4, trained=True),
            "ref": ModelSize(n, 4), "reward": ModelSize(n, 4)}


def test_plan_everything_fits():
    plan = plan_memory(_sizes(MB), budget_bytes=100 * MB, device="cuda:0", has_vllm=True,
                       vllm_kv_bytes=10 * MB)
    assert {w for ph in plan.placement.values() for k, w in ph.items() if "vllm" not in k} == {"resident"}
    # vLLM sleeps in SCORE / TRAIN and only its weights wake for SYNC, whatever fits
    assert [plan.placement[p]["vllm.kv"] for p in ("generate", "score", "train", "sync")] == \
        ["resident", "offloaded", "offloaded", "offloaded"]
    assert plan.placement["sync"]["vllm.weights"] == "resident"


def test_plan_offloads_what_does_not_fit():
    # params 4 MB each, optim 12 MB each (actor, critic), vLLM weights 2 MB + KV 20 MB; 40 MB usable.
    plan = plan_memory(_sizes(MB), budget_bytes=int(40 * MB / 0.9), device="cuda:0", has_vllm=True,
                       vllm_kv_bytes=20 * MB)
    gen, score, train, sync = (plan.placement[p] for p in ("generate", "score", "train", "sync"))
    # GENERATE: vLLM 22 MB, then params in order of preference (actor, critic, ref, reward = 16 MB)
    assert gen["vllm.kv"] == gen["vllm.weights"] == "resident"
    assert [gen[f"{m}.params"] for m in ("actor", "critic", "ref", "reward")] == ["resident"] * 4
    assert gen["actor.optim"] == gen["critic.optim"] == "offloaded"
    # TRAIN: 32 MB of training state; ref (4 MB) fits, then reward (4 MB) fits exactly; vLLM does not
    assert train["actor.optim"] == train["critic.optim"] == "resident"
    assert train["vllm.kv"] == "offloaded"
    # SCORE: vLLM asleep; 16 MB of params, then actor optim (12) fits, critic optim (12) does not
    assert score["vllm.kv"] == score["vllm.weights"] == "offloaded"
    assert score["actor.optim"] == "resident" and score["critic.optim"] == "offloaded"
    assert sync["vllm.kv"] == "offloaded"
    assert sync["actor.params"] == sync["vllm.weights"] == "resident"
    table = plan.format()
    assert "actor.optim" in table and "generate" in table
    assert plan.flat_metrics()["plan/generate/actor.optim"] == 0.0


def test_plan_sequential_scoring_and_error():
    # each model 40 MB of params; 100 MB usable: SCORE cannot hold all four, only actor + one other
    sizes = _sizes(10 * MB)
    sizes["actor"] = ModelSize(10 * MB, 4, trained=False)
    sizes["critic"] = ModelSize(10 * MB, 4, trained=False)
    plan = plan_memory(sizes, budget_bytes=int(100 * MB / 0.9), device="cuda:0")
    assert plan.placement["score"]["actor.params"] == "resident"
    assert {plan.placement["score"][f"{m}.params"] for m in ("critic", "ref", "reward")} == {"sequential"}
    assert any("one at a time" in n for n in plan.notes)
    with pytest.raises(MemoryPlanError, match=r"'score' needs 80.0 MB .* one at a time\) but only 45.0"):
        plan_memory(_sizes(10 * MB), budget_bytes=50 * MB, device="cuda:0", world_size=1)
    with pytest.raises(MemoryPlanError, match=r"phase 'train' needs 320.0 MB"):  # 2 x (40 + 120)
        plan_memory(_sizes(10 * MB), budget_bytes=100 * MB, device="cuda:0", world_size=1)
    # the same models over 8 ranks fit
    plan_memory(_sizes(10 * MB), budget_bytes=50 * MB, device="cuda:0", world_size=8)


def test_cpu_plan_is_all_resident_and_hooks_move_nothing():
    rt = Runtime(device=torch.device("cpu"))
    actor, critic, ref, rm = (tiny_llama(64, seed=i) for i in range(4))
    actor, critic, ref, rm = prepare_models(rt, actor=actor, critic=critic, ref=ref, reward_model=rm)
    assert not any(p.requires_grad for p in ref.parameters())
    assert rt.sizes["actor"] == model_size(actor, trained=True)
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
    sizes = {"actor": model_size(actor, trained=True), "ref": model_size(ref, trained=False)}
    nb = item_bytes(sizes)
    # TRAIN holds actor params + optim; the budget leaves no room for ref then; SCORE needs both params.
    budget = int((nb["actor.params"] + nb["actor.optim"]) / 0.9) + 1
    plan = plan_memory(sizes, budget_bytes=budget, device="cpu")
    assert plan.placement["train"]["ref.params"] == "offloaded"
    assert plan.placement["score"]["actor.optim"] == "offloaded"
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


class RecordingRollout:
    """Records sleep / wake into the scheduler's own event log, so one list shows the whole order."""

    def __init__(self, events, sleep_level):
        self.events, self.sleep_level = events, sleep_level

    def sleep(self, level):
        self.events.append(("engine", f"sleep({level})"))

    def wake(self, tags=None):
        self.events.append(("engine", "wake" if tags is None else f"wake({','.join(tags)})"))


def _handover_scheduler(sleep_level):
    """A plan on a fake budget that offloads the actor's optimizer state for GENERATE and SYNC."""
    sched = PhaseScheduler("cpu")
    actor = tiny_llama(64, seed=0)
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-3)
    actor(torch.randint(0, 64, (2, 5))).logits.sum().backward()
    opt.step()
    sizes = {"actor": model_size(actor, trained=True)}
    nb_kv = MB // 16
    nb = item_bytes(sizes, has_vllm=True, vllm_param_bytes=4, vllm_kv_bytes=nb_kv)
    budget = int((nb["actor.params"] + nb["actor.optim"]) / 0.9) + 1
    assert nb["vllm.weights"] + nb_kv + nb["actor.params"] < budget * 0.9  # GENERATE fits without optim
    plan = plan_memory(sizes, budget_bytes=budget, device="cpu", has_vllm=True, vllm_param_bytes=4,
                       vllm_kv_bytes=nb_kv)
    assert plan.placement["generate"]["actor.optim"] == "offloaded"
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


def test_plan_with_an_engine_that_never_sleeps_counts_it_in_every_phase():
    sizes = {"actor": ModelSize(MB, 4, trained=True)}
    kw = dict(budget_bytes=200 * MB, device="cuda:0", has_vllm=True, vllm_param_bytes=2, vllm_kv_bytes=8 * MB)
    asleep = plan_memory(sizes, **kw)
    awake = plan_memory(sizes, **kw, vllm_sleeps=False)
    assert asleep.placement["train"]["vllm.kv"] == "offloaded"
    assert all(awake.placement[p][k] == "resident" for p in awake.placement for k in ("vllm.weights", "vllm.kv"))
    with pytest.raises(MemoryPlanError, match="'train' needs"):  # 4 + 12 MB of actor + 10 MB engine > 18 usable
        plan_memory(sizes, **{**kw, "budget_bytes": 20 * MB}, vllm_sleeps=False)
    plan_memory(sizes, **{**kw, "budget_bytes": 20 * MB})  # fits when the engine sleeps


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


def test_plan_counts_the_gathered_actor_in_hf_generate_under_fsdp():
    """HF rollout of an FSDP2 actor all-gathers the whole actor for GENERATE (``rollout.hf.gathered``): the
    plan holds it there, in the compute dtype, on top of the shards; vLLM or plain modules: no such item."""
    sizes = _sizes(10 * MB)  # 10M params each; per rank over 8 ranks: 5 MB fp32 shards
    kw = dict(device="cuda:0", world_size=8, precision="bf16")
    plan = plan_memory(sizes, budget_bytes=10**12, fsdp=True, **kw)
    assert plan.bytes["actor.gathered"] == 10 * MB * 2  # the full actor in bf16, not a shard
    assert {p: plan.placement[p]["actor.gathered"] for p in ("generate", "score", "train", "sync")} == {
        "generate": "resident", "score": "offloaded", "train": "offloaded", "sync": "offloaded"}
    assert "actor.gathered" in plan.format() and any("all-gathers the whole actor" in n for n in plan.notes)
    assert "actor.gathered" not in plan_memory(sizes, budget_bytes=10**12, **kw).bytes  # plain modules
    assert "actor.gathered" not in plan_memory(sizes, budget_bytes=10**12, fsdp=True, has_vllm=True, **kw).bytes
    # without a critic, 24 MB usable: TRAIN (5 + 15 MB) and SCORE (3 x 5 MB) fit, and so would GENERATE's
    # 5 MB shard alone; with the gathered 20 MB actor GENERATE needs 25 MB: refused, naming the phase
    no_critic = {**sizes, "critic": None}
    budget = int(24 * MB / 0.9)
    plan_memory(no_critic, budget_bytes=budget, **kw)
    with pytest.raises(MemoryPlanError, match=r"phase 'generate' needs 25.0 MB .*actor.gathered"):
        plan_memory(no_critic, budget_bytes=budget, fsdp=True, **kw)


def test_plan_counts_optimizer_state_of_trainable_parameters_only():
    """With LoRA the base weights are frozen: grads + Adam state are planned for the adapters alone."""
    model = tiny_llama(64, seed=0)
    full = model_size(model, trained=True)
    assert full.trainable is None
    for name, p in model.named_parameters():
        p.requires_grad_("embed" in name)  # stand-in for adapters: only the embedding trains
    part = model_size(model, trained=True)
    embed = model.get_input_embeddings().weight.numel()
    assert part.numel == full.numel and part.trainable == embed
    per = full.param_bytes + full.optim_bytes_per_param
    assert item_bytes({"actor": full})["actor.optim"] == full.numel * per
    assert item_bytes({"actor": part})["actor.optim"] == embed * per
    assert item_bytes({"actor": part})["actor.params"] == full.numel * full.param_bytes

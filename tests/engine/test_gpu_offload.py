"""On a GPU: offload / onload really free and restore device memory; FSDP2 with bf16 mixed precision in
a one-rank NCCL group trains; the memory plan is computed from the device's total memory."""
from __future__ import annotations

import pytest
import torch

from fastrlhf.engine.fsdp import offload_to_cpu, onload, shard_model
from fastrlhf.engine.runtime import Runtime, prepare_models
from fastrlhf.models import tiny_llama

pytestmark = pytest.mark.gpu


def _trained(device):
    model = tiny_llama(1000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 1000, (2, 16), device=device)).logits.float().sum().backward()
    opt.step()
    return model, opt


def test_offload_frees_and_onload_restores_device_memory():
    dev = torch.device("cuda")
    model, opt = _trained(dev)
    before = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    numel = sum(p.numel() for p in model.parameters())
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated()
    offload_to_cpu(model, opt)
    torch.cuda.synchronize()
    freed = used - torch.cuda.memory_allocated()
    # params + grads + both Adam moments leave the device
    assert freed >= 0.95 * numel * (4 + 4 + 8)  # fp32 params, grads, two Adam moments
    onload(model, opt, device=dev)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(t.device.type == "cuda" for s in opt.state.values() for k, t in s.items() if k != "step")
    assert all(torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())
    opt.step()  # the optimizer still works after the round trip


def test_plan_from_the_device_memory_and_hooks_on_cuda():
    rt = Runtime(device=torch.device("cuda"))
    models = [tiny_llama(1000, seed=i) for i in range(4)]
    prepare_models(rt, actor=models[0], critic=models[1], ref=models[2], reward_model=models[3], fsdp=False)
    plan = rt.scheduler.plan
    assert plan.budget_bytes == torch.cuda.get_device_properties(0).total_memory
    assert plan.offload == "none" and set(plan.predicted) == {"generate", "score", "train", "sync"}
    with rt.scheduler.phase("generate"):
        pass
    assert "mem/generate_peak_mb" in rt.scheduler.pop_stats()


def test_fsdp2_bf16_mixed_precision_single_rank(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = shard_model(tiny_llama(1000, num_layers=2), device=torch.device("cuda"), train=True)
        ids = torch.randint(0, 1000, (2, 8), device="cuda")
        logits = model(ids).logits
        assert logits.dtype == torch.bfloat16  # compute in bf16
        logits.float().sum().backward()
        p = next(model.parameters())
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32  # fp32 master shards and grads
    finally:
        dist.destroy_process_group()

"""RunningMoments against numpy on the concatenated data; normalize_rewards modes and errors."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastrlhf.algo import RunningMoments, normalize_rewards


def batches(offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (33,), (4, 5), (1,), (0,), (2, 3, 2)]
    return [offset + torch.randn(s, generator=g, dtype=torch.float64) * 3 + 1 for s in shapes]


@pytest.mark.parametrize("offset", [0.0, 1e8])  # 1e8: the naive sum of squares loses every digit
def test_running_moments_match_numpy(offset):
    rm = RunningMoments()
    data = batches(offset)
    seen = []
    for x in data:
        batch_mean, batch_std = rm.update(x)
        seen.append(x.reshape(-1).numpy())
        flat = np.concatenate(seen)
        assert rm.count == flat.size
        if x.numel():
            assert batch_mean == pytest.approx(x.mean().item(), rel=1e-12)
        if flat.size > 1:
            assert rm.mean == pytest.approx(flat.mean(), rel=1e-12, abs=1e-12)
            assert rm.var == pytest.approx(flat.var(ddof=1), rel=1e-6)
            assert rm.std == pytest.approx(flat.std(ddof=1), rel=1e-6)
    assert rm.count == 74


def test_running_moments_float32_input_and_state_dict():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 3.0]))
    assert rm.var == pytest.approx(1.0) and rm.mean == pytest.approx(2.0)
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    rm.update(torch.tensor([10.0]))
    other.update(torch.tensor([10.0]))
    assert (rm.count, rm.mean, rm.var) == (other.count, other.mean, other.var)
    assert rm.var == pytest.approx(np.var([1, 2, 3, 10], ddof=1))
    with pytest.raises(ValueError, match="NaN"):
        rm.update(torch.tensor([1.0, float("nan")]))
    assert rm.count == 4  # a rejected batch leaves the moments alone


def test_single_value_has_zero_variance():
    rm = RunningMoments()
    rm.update(torch.tensor([5.0]))
    assert rm.var == 0.0 and rm.mean == 5.0


def test_normalize_none_batch_length_clip():
    s = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(normalize_rewards(s, mode="none"), s.float())
    out = normalize_rewards(s, mode="batch")  # mean 2, unbiased var 1
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(normalize_rewards(torch.tensor([4.0]), mode="batch"), torch.tensor([0.0]))
    out = normalize_rewards(s, mode="length", lengths=torch.tensor([2, 4, 1]))
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, 3.0]))
    out = normalize_rewards(torch.tensor([-5.0, 0.3, 9.0]), mode="none", clip=1.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.3, 1.0]))
    out = normalize_rewards(s, mode="length", lengths=[1, 1, 1], clip=2.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 2.5]))


def test_normalize_running_uses_accumulated_stats():
    rm = RunningMoments()
    a = torch.tensor([0.0, 2.0])
    out = normalize_rewards(a, mode="running", stats=rm)  # stats of [0, 2]: mean 1, var 2
    torch.testing.assert_close(out, (a - 1) / np.sqrt(2.0), atol=1e-6, rtol=0)
    b = torch.tensor([4.0, 6.0])
    out = normalize_rewards(b, mode="running", stats=rm)  # stats of [0, 2, 4, 6]: mean 3, var 20/3
    torch.testing.assert_close(out, (b - 3) / np.sqrt(20 / 3), atol=1e-6, rtol=0)
    assert rm.count == 4


def test_normalize_errors():
    s = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="RunningMoments"):
        normalize_rewards(s, mode="running")
    with pytest.raises(ValueError, match="lengths"):
        normalize_rewards(s, mode="length")
    with pytest.raises(ValueError, match="> 0"):
        normalize_rewards(s, mode="length", lengths=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="lengths"):
        normalize_rewards(s, mode="length", lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="mode"):
        normalize_rewards(s, mode="whiten")
    with pytest.raises(ValueError, match="clip"):
        normalize_rewards(s, mode="none", clip=0.0)
    with pytest.raises(ValueError, match=r"\[B\]"):
        normalize_rewards(s[None], mode="none")


def _distributed_worker(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rm = RunningMoments()
        for step, x in enumerate(batches(seed=0)):
            # rank 0 gets the first part of every batch, rank 1 the rest (which may be empty)
            flat = x.reshape(-1)
            cut = flat.numel() // 2 + (step % 2)
            rm.update(flat[:cut] if rank == 0 else flat[cut:])
        torch.save(rm.state_dict(), f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_running_moments_all_reduce_over_two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result = os.path.join(tmp, "init"), os.path.join(tmp, "state")
        mp.spawn(_distributed_worker, args=(2, init_file, result), nprocs=2, join=True)
        states = [torch.load(f"{result}.{r}") for r in range(2)]
    flat = np.concatenate([x.reshape(-1).numpy() for x in batches(seed=0)])
    for st in states:
        assert st["count"] == flat.size
        assert st["mean"] == pytest.approx(flat.mean(), rel=1e-12)
        assert st["m2"] / (st["count"] - 1) == pytest.approx(flat.var(ddof=1), rel=1e-10)

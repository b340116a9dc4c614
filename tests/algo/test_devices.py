"""The algo math on CUDA tensors gives the CPU results (GPU machine only)."""
import pytest
import torch

from fastrlhf.algo import (RunningMoments, bradley_terry_loss, expected_calibration_error, normalize_rewards,
                           token_rewards)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 11
    lp, ref = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False
    scores, other = torch.randn(B, generator=g), torch.randn(B, generator=g)
    cuda = [t.cuda() for t in (scores, other, lp, ref, mask)]

    for a, b in zip(token_rewards(scores, lp, ref, mask, kl_coef=0.1, kl_kind="k3"),
                    token_rewards(cuda[0], *cuda[2:], kl_coef=0.1, kl_kind="k3"), strict=True):
        torch.testing.assert_close(b.cpu(), a)
    for a, b in zip(bradley_terry_loss(scores, other, margin=other.abs()),
                    bradley_terry_loss(cuda[0], cuda[1], margin=cuda[1].abs()), strict=True):
        torch.testing.assert_close(b.cpu(), a)
    torch.testing.assert_close(expected_calibration_error(cuda[0], cuda[1]).cpu(),
                               expected_calibration_error(scores, other))
    cpu_rm, cuda_rm = RunningMoments(), RunningMoments()
    for _ in range(2):
        a = normalize_rewards(scores, mode="running", stats=cpu_rm, clip=1.0)
        b = normalize_rewards(cuda[0], mode="running", stats=cuda_rm, clip=1.0)
        torch.testing.assert_close(b.cpu(), a)
    assert cuda_rm.state_dict() == pytest.approx(cpu_rm.state_dict())

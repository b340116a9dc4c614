"""KL controllers: exact update sequences, clamping, checkpoint round trip, bad inputs."""
import math

import pytest

from fastrlhf.algo import AdaptiveKLController, FixedKLController, StepKLController


def test_fixed_never_moves():
    c = FixedKLController(0.05)
    for kl in (0.0, 100.0, -3.0):
        assert c.update(kl, 64) == 0.05
    assert c.value == 0.05 and isinstance(c.value, float)


def test_adaptive_exact_sequence():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    expected = 0.1
    # error clipped at +0.2, clipped at -0.2, unclipped +0.1, unclipped -0.05, zero steps
    steps = [(12.0, 256, 0.2), (3.0, 256, -0.2), (6.6, 100, 0.1), (5.7, 512, -0.05), (60.0, 0, 0.2)]
    for kl, n, err in steps:
        expected *= 1 + err * n / 10000
        assert c.update(kl, n) == pytest.approx(expected, rel=1e-12)
    assert c.value == pytest.approx(0.1 * 1.00512 * 0.99488 * 1.001 * (1 - 0.05 * 512 / 10000), rel=1e-12)


def test_step_exact_sequence_and_clamp():
    c = StepKLController(0.1, target=1.0)  # factor 2, tolerance 1.5, clamp [0.01, 0.5]
    seq = [(2.0, 0.2), (2.0, 0.4), (2.0, 0.5),   # up, up, clamped at max
           (1.2, 0.5), (0.7, 0.5),                # inside [1/1.5, 1.5]: unchanged
           (0.5, 0.25), (0.1, 0.125), (0.1, 0.0625), (0.1, 0.03125), (0.1, 0.015625),
           (0.1, 0.01), (0.0, 0.01)]
    for kl, value in seq:
        assert c.update(kl, 1) == pytest.approx(value, rel=1e-12)


def test_step_custom_factor_and_tolerance():
    c = StepKLController(0.2, target=0.5, factor=1.5, tolerance=1.1, min_coef=0.0, max_coef=1.0)
    assert c.update(0.56, 1) == pytest.approx(0.3)      # 0.56 > 0.55
    assert c.update(0.55, 1) == pytest.approx(0.3)      # not strictly above
    assert c.update(0.45, 1) == pytest.approx(0.2)      # 0.45 < 0.4545...


@pytest.mark.parametrize("make", [
    lambda: AdaptiveKLController(0.2, 1.0, 100),
    lambda: StepKLController(0.2, 1.0),
    lambda: FixedKLController(0.2),
])
def test_state_dict_resume_is_exact(make):
    kls = [3.0, 0.1, 1.7, 0.9, 2.4, 0.05]
    straight = make()
    for kl in kls:
        straight.update(kl, 16)
    first = make()
    for kl in kls[:3]:
        first.update(kl, 16)
    resumed = make()
    resumed.load_state_dict(dict(first.state_dict()))
    for kl in kls[3:]:
        resumed.update(kl, 16)
    assert resumed.value == straight.value


def test_state_dict_kind_mismatch_and_bad_inputs():
    with pytest.raises(ValueError, match="adaptive"):
        StepKLController(0.1, 1.0).load_state_dict(AdaptiveKLController(0.1, 1.0, 10).state_dict())
    c = AdaptiveKLController(0.1, 1.0, 10)
    with pytest.raises(ValueError, match="current_kl"):
        c.update(math.nan, 1)
    assert c.value == 0.1
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 1.0, -5)
    with pytest.raises(ValueError, match="min_coef"):
        StepKLController(0.1, 1.0, min_coef=0.6, max_coef=0.5)
    with pytest.raises(ValueError, match="factor"):
        StepKLController(0.1, 1.0, factor=1.0)

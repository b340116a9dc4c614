"""KL-penalty coefficient controllers for PPO (fixed, proportional, step).

Each controller holds ``.value`` (a Python float, the current ``kl_coef``) and changes it in
``update(current_kl, n_steps)``, called once per PPO iteration with the measured mean KL per sequence
(or per token, as long as ``target`` uses the same unit) and the number of samples (or steps) that
iteration covered. ``state_dict()`` / ``load_state_dict()`` carry the only changing state, ``value``,
so a resumed run continues exactly (the fixed settings come from the run's config).
"""
from __future__ import annotations

import math


def _finite(name: str, x) -> float:
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _positive(name: str, x) -> float:
    value = _finite(name, x)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class _Controller:
    kind = "base"
    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for a {state.get('kind')!r} KL controller, this one is {self.kind!r}")
        self.value = _finite("value", state["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value!r})"


class FixedKLController(_Controller):
    """Constant coefficient; ``update`` only validates its input."""

    kind = "fixed"

    def __init__(self, value: float):
        self.value = _finite("value", value)
        if self.value < 0:
            raise ValueError(f"value must be >= 0, got {self.value}")

    def update(self, current_kl: float, n_steps: int) -> float:
        _finite("current_kl", current_kl)
        return self.value


class AdaptiveKLController(_Controller):
    """Proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", sec. 2.2): ``e = clip(current_kl / target - 1, -0.2, 0.2)``,
    ``value <- value * (1 + e * n_steps / horizon)``."""

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = _positive("init_kl_coef", init_kl_coef)
        self.target = _positive("target", target)
        self.horizon = _positive("horizon", horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        current = _finite("current_kl", current_kl)
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class StepKLController(_Controller):
    """Multiplicative step rule (as in PPO's adaptive-KL variant, Schulman et al. 2017, sec. 4):
    ``current > tolerance * target`` -> ``value *= factor``; ``current < target / tolerance`` ->
    ``value /= factor``; then ``value`` is clamped to ``[min_coef, max_coef]``. ``n_steps`` is ignored."""

    kind = "step"

    def __init__(self, init_kl_coef: float, target: float, factor: float = 2.0, tolerance: float = 1.5,
                 min_coef: float = 0.01, max_coef: float = 0.5):
        self.value = _positive("init_kl_coef", init_kl_coef)
        self.target = _positive("target", target)
        self.factor = _positive("factor", factor)
        self.tolerance = _positive("tolerance", tolerance)
        self.min_coef = _finite("min_coef", min_coef)
        self.max_coef = _finite("max_coef", max_coef)
        if self.factor <= 1 or self.tolerance < 1:
            raise ValueError(f"need factor > 1 and tolerance >= 1, got factor={factor}, "
                             f"tolerance={tolerance}")
        if not 0 <= self.min_coef <= self.max_coef:
            raise ValueError(f"need 0 <= min_coef <= max_coef, got [{min_coef}, {max_coef}]")

    def update(self, current_kl: float, n_steps: int) -> float:
        current = _finite("current_kl", current_kl)
        if current > self.tolerance * self.target:
            self.value *= self.factor
        elif current < self.target / self.tolerance:
            self.value /= self.factor
        self.value = min(max(self.value, self.min_coef), self.max_coef)
        return self.value

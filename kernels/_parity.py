"""First-use parity check: on CUDA, the first Triton launch of a process (per device) first runs every
Triton op and its PyTorch path on a small random input and compares them (well under a second once the
kernels are compiled, which the first call pays anyway). A mismatch raises ``TritonParityError`` telling
the user to switch to the PyTorch path and report it: a miscompiled kernel on an untested GPU, driver or
Triton version must stop the run, not train on wrong gradients.

State: the set of devices already checked in this process (the point of "first use"). Nothing else.
On CPU (the Triton interpreter) the check is skipped: the test suite compares both paths there already.
"""
from __future__ import annotations

import torch

from ._backend import interpreter_enabled

_CHECKED: set[str] = set()  # devices that passed in this process

# fp32 inputs on both paths: the only differences are fp32 rounding and summation order.
_TOL = 2e-4  # |triton - torch| <= _TOL * max(1, max |torch|)
# Small, irregular: odd V (no vector-aligned rows), a masked row, T != 1; linear_token_logprobs takes its
# default (vocabulary-split) backward, fused_ppo_loss two token chunks.
_N, _V, _H, _CHUNK = 48, 1003, 64, 32


class TritonParityError(RuntimeError):
    """The Triton path and the PyTorch path disagree on this device."""


def needs_check(device: torch.device) -> bool:
    """The check runs for compiled kernels on CUDA, once per device and process."""
    return device.type == "cuda" and not interpreter_enabled() and str(device) not in _CHECKED


def ensure_parity(device: torch.device) -> None:
    """Run ``parity_errors`` on ``device`` unless this process already has; raise on a mismatch."""
    if not needs_check(device):
        return
    failures = [(op, what, err) for op, what, err in parity_errors(device) if not err <= _TOL]
    if failures:
        raise TritonParityError(_message(device, failures))
    _CHECKED.add(str(device))


def _message(device: torch.device, failures) -> str:
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    what = "; ".join(f"{op} {w}: rel. error {e:.3g}" for op, w, e in failures)
    return (f"fastrlhf.kernels: the Triton kernels disagree with the PyTorch path on {device} ({name}, "
            f"torch {torch.__version__}, triton {triton.__version__}): {what} (tolerance {_TOL:g}). Use "
            f"kernel_backend=torch (config key, or backend='torch' when calling fastrlhf.kernels), and "
            f"please report this message to the fastrlhf issue tracker.")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def _grads(out, leaves, upstream):
    loss = sum((o * u).sum() for o, u in zip(out, upstream))
    return torch.autograd.grad(loss, leaves)


def parity_errors(device: torch.device) -> list[tuple[str, str, float]]:
    """``(op, output, relative max error)`` of every Triton op against its PyTorch path on ``device``."""
    g = torch.Generator(device=device).manual_seed(1234)
    rand = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    logits, h, w = rand(_N, _V) * 3, rand(_N, _H), rand(_V, _H) / _H ** 0.5 * 3
    labels = torch.randint(0, _V, (_N,), device=device, generator=g)
    labels[5] = -100
    up = [rand(_N), rand(_N)]
    precision = torch.get_float32_matmul_precision()  # TF32 would differ between chunkings: compare in fp32
    torch.set_float32_matmul_precision("highest")
    try:
        return _errors(device, g, logits, h, w, labels, up, rand)
    finally:
        torch.set_float32_matmul_precision(precision)


def _errors(device, g, logits, h, w, labels, up, rand):
    import importlib
    # by module: the package re-exports functions under the same names (fastrlhf.kernels.gae is the function)
    gae_mod, linear_logprobs, logprobs = (importlib.import_module(f"{__package__}.{m}")
                                          for m in ("gae", "linear_logprobs", "logprobs"))
    with torch.autocast(device.type, enabled=False), torch.enable_grad():
        x = logits.clone().requires_grad_(True)
        runs = [(out, _grads(out, [x], up)) for out in (
            logprobs._token_logprobs_triton(x, labels, 0.9, -100, True),
            logprobs.token_logprobs(x, labels, temperature=0.9, return_entropy=True, backend="torch"))]
        errors = _compare("token_logprobs", ("lp", "entropy", "dlogits"), runs)
        hw = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        runs = [(out, _grads(out, hw, up)) for out in (
            linear_logprobs._linear_token_logprobs_triton(hw[0], hw[1], labels, None, 0.9, -100, True, None),
            linear_logprobs.linear_token_logprobs(hw[0], hw[1], labels, temperature=0.9, return_entropy=True,
                                                  backend="torch"))]
        errors += _compare("linear_token_logprobs", ("lp", "entropy", "grad_hidden", "grad_weight"), runs)
        errors += _ppo_errors(device, g, x, hw, labels)
        rewards, values = rand(4, _N // 4), rand(4, _N // 4)
        mask = torch.rand(4, _N // 4, device=device, generator=g) < 0.7
        got = gae_mod._gae_triton(rewards, values, mask, 0.99, 0.95)
        want = gae_mod.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="torch")
        errors += [("gae", k, _rel(a, b)) for k, a, b in zip(("advantages", "returns"), got, want)]
    return errors


def _compare(op, names, runs):
    (out_a, grads_a), (out_b, grads_b) = runs
    return [(op, k, _rel(a, b)) for k, a, b in zip(names, (*out_a, *grads_a), (*out_b, *grads_b))]


def _ppo_errors(device, g, x, hw, labels):
    import importlib
    ppo_loss = importlib.import_module(f"{__package__}.ppo_loss")
    B, T = 4, _N // 4
    mask = labels.view(B, T) != -100
    lab = labels.view(B, T).clamp(min=0)
    old = torch.randn(B, T, device=device, generator=g) * 0.3 - 7.0
    adv, ref = torch.randn(B, T, device=device, generator=g), old + 0.1
    kw = dict(ref_logprobs=ref, kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_low=0.2, clip_high=None,
              dual_clip=3.0, temperature=0.9, loss_agg="token-mean", return_logprobs=False)
    errors = []
    xs = x.detach().view(B, T, -1).clone().requires_grad_(True)
    got, _ = ppo_loss._fused_ppo_loss_from_logits_triton(xs, lab, old, adv, mask, kw)
    want, _ = ppo_loss.fused_ppo_loss_from_logits(xs, lab, old, adv, mask, backend="torch", **kw)
    (ga,), (gb,) = torch.autograd.grad(got, [xs]), torch.autograd.grad(want, [xs])
    errors += [("fused_ppo_loss_from_logits", "loss", _rel(got, want)), ("fused_ppo_loss_from_logits",
                                                                          "dlogits", _rel(ga, gb))]
    h = hw[0].detach().view(B, T, -1).clone().requires_grad_(True)
    w = hw[1].detach().clone().requires_grad_(True)
    got, _ = ppo_loss._fused_ppo_loss_triton(h, w, lab, old, adv, mask, _CHUNK, kw)
    want, _ = ppo_loss.fused_ppo_loss(h, w, lab, old, adv, mask, backend="torch", **kw)
    ga, gb = torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])
    errors += [("fused_ppo_loss", "loss", _rel(got, want))]
    errors += [("fused_ppo_loss", k, _rel(a, b)) for k, a, b in zip(("grad_hidden", "grad_weight"), ga, gb)]
    return errors

"""The public surface of /work/shared/API.md, checked name by name.

1. Every documented name imports from its documented module, and its signature has the documented
   argument names, kinds (positional vs keyword-only after ``*``) and defaults. API.md lets the surface
   grow by "new keyword arguments with defaults", so an undocumented parameter passes only when it is
   keyword-only and has a default; everything documented must match exactly.
2. The conventions of API.md's preamble, one small case per op: float32 outputs for bf16 inputs, ``stats``
   as dicts of detached 0-dim float32 tensors, ``return_logprobs=True`` giving a 3-tuple, the backend
   argument (unknown -> ValueError, "triton" on CPU without the interpreter -> a clear error or a result),
   and results that do not depend on NaN/inf garbage at masked-out positions (values and gradients).
3. The ``fastrlhf`` command line: subcommands and flags reach their entry points with the documented values.

The numerics of each op are tested in its own test file; here only the contract is.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The documented signatures, copied from API.md (module, name, "(parameters)").
# For fused_ppo_loss_from_logits API.md says "the same with logits given": the parameters of fused_ppo_loss
# with (hidden, weight) replaced by logits and without chunk_size (no vocabulary projection to chunk).
_PPO_KW = ("ref_logprobs=None, kl_coef=0.0, kl_kind='k3', entropy_coef=0.0, clip_low=0.2, clip_high=None, "
           "dual_clip=None, temperature=1.0, loss_agg='token-mean'")
DOCUMENTED = [
    ("fastrlhf.kernels", "token_logprobs",
     "(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, backend='auto')"),
    ("fastrlhf.kernels", "linear_token_logprobs",
     "(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False, "
     "chunk_size=None, backend='auto')"),
    ("fastrlhf.kernels", "kl_estimate", "(logprobs, ref_logprobs, kind='k1')"),
    ("fastrlhf.kernels", "masked_mean", "(x, mask, dim=None)"),
    ("fastrlhf.kernels", "masked_var", "(x, mask, unbiased=True)"),
    ("fastrlhf.kernels", "masked_whiten", "(x, mask, shift_mean=True, eps=1e-8)"),
    ("fastrlhf.kernels", "gae", "(rewards, values, mask, *, gamma=1.0, lam=0.95, backend='auto')"),
    ("fastrlhf.kernels", "ppo_policy_loss",
     "(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None, "
     "loss_agg='token-mean')"),
    ("fastrlhf.kernels", "ppo_value_loss",
     "(values, old_values, returns, mask, *, clip=0.2, loss_agg='token-mean')"),
    ("fastrlhf.kernels", "fused_ppo_loss",
     f"(hidden, weight, labels, old_logprobs, advantages, mask, *, {_PPO_KW}, chunk_size=None, "
     "return_logprobs=False, backend='auto')"),
    ("fastrlhf.kernels", "fused_ppo_loss_from_logits",
     f"(logits, labels, old_logprobs, advantages, mask, *, {_PPO_KW}, return_logprobs=False, "
     "backend='auto')"),
    ("fastrlhf.algo", "bradley_terry_loss", "(chosen, rejected, margin=None)"),
    ("fastrlhf.algo", "token_rewards", "(scores, logprobs, ref_logprobs, mask, *, kl_coef, kl_kind='k1')"),
    ("fastrlhf.algo", "FixedKLController", "(value)"),
    ("fastrlhf.algo", "AdaptiveKLController", "(init_kl_coef, target, horizon)"),
    ("fastrlhf.algo", "StepKLController",
     "(init_kl_coef, target, factor=2.0, tolerance=1.5, min_coef=0.01, max_coef=0.5)"),
    ("fastrlhf.algo", "FixedKLController.update", "(current_kl, n_steps)"),
    ("fastrlhf.algo", "AdaptiveKLController.update", "(current_kl, n_steps)"),
    ("fastrlhf.algo", "StepKLController.update", "(current_kl, n_steps)"),
    ("fastrlhf.algo", "normalize_rewards", "(scores, *, mode='batch', lengths=None, clip=None, stats=None)"),
    ("fastrlhf.algo", "expected_calibration_error", "(chosen, rejected, n_bins=10)"),
    ("fastrlhf.data", "sft_features", "(prompt, response, tokenizer, *, max_length=None)"),
    ("fastrlhf.data", "chat_sft_features", "(messages, tokenizer, *, max_length=None)"),
    ("fastrlhf.models", "RewardModel", "(backbone)"),
    ("fastrlhf.models", "ValueModel", "(backbone)"),
    ("fastrlhf.models", "RewardModel.forward", "(input_ids, attention_mask)"),
    ("fastrlhf.models", "ValueModel.forward", "(input_ids, attention_mask)"),
]
# Named in API.md without a signature: they must exist (and be classes where API.md says so).
NAMES_ONLY = [("fastrlhf.algo", "RunningMoments"), ("fastrlhf.models", "RewardModel.save_pretrained"),
              ("fastrlhf.models", "RewardModel.from_pretrained")]
REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("SFTTrainer", "RewardTrainer", "PPOTrainer")
CONFIGS = ("SFTConfig", "RewardConfig", "PPOConfig")


def _resolve(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        assert hasattr(obj, part), f"{module}.{dotted}: {part!r} is missing (API.md documents it)"
        obj = getattr(obj, part)
    return obj


def _expected(params: str) -> inspect.Signature:
    scope: dict = {}
    exec(f"def _f{params}: pass", scope)  # noqa: S102 - our own literal strings above
    return inspect.signature(scope["_f"])


def _actual(module: str, dotted: str) -> inspect.Signature:
    obj = _resolve(module, dotted)
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())
    if "." in dotted and params and params[0].name == "self":  # method looked up on its class
        sig = sig.replace(parameters=params[1:])
    return sig


def _same_default(a, b) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def signature_mismatches(expected: inspect.Signature, actual: inspect.Signature) -> list[str]:
    """Every way ``actual`` breaks the documented ``expected`` (empty when it honours the contract)."""
    problems = []
    exp, act = expected.parameters, actual.parameters
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    exp_pos = [n for n, p in exp.items() if p.kind in positional]
    act_pos = [n for n, p in act.items() if p.kind in positional]
    if act_pos != exp_pos:
        problems.append(f"positional parameters {act_pos}, documented {exp_pos}")
    for name, p in exp.items():
        q = act.get(name)
        if q is None:
            problems.append(f"parameter {name!r} missing")
            continue
        if q.kind != p.kind:
            problems.append(f"{name!r} is {q.kind.description}, documented {p.kind.description}")
        if not _same_default(q.default, p.default):
            exp_d = "no default" if p.default is p.empty else repr(p.default)
            act_d = "no default" if q.default is q.empty else repr(q.default)
            problems.append(f"{name!r} default {act_d}, documented {exp_d}")
    for name, q in act.items():
        if name in exp:
            continue
        if q.kind is not inspect.Parameter.KEYWORD_ONLY or q.default is q.empty:
            problems.append(f"undocumented {q.kind.description} parameter {name!r} "
                            "(only new keyword-only arguments with defaults may be added)")
    return problems


@pytest.mark.parametrize(("module", "name", "params"), DOCUMENTED, ids=[f"{m}.{n}" for m, n, _ in DOCUMENTED])
def test_documented_signature(module, name, params):
    problems = signature_mismatches(_expected(params), _actual(module, name))
    assert not problems, f"{module}.{name}{_actual(module, name)} vs API.md {params}: " + "; ".join(problems)


@pytest.mark.parametrize(("module", "name"), NAMES_ONLY, ids=[f"{m}.{n}" for m, n in NAMES_ONLY])
def test_documented_name_exists(module, name):
    assert callable(_resolve(module, name))


def test_signature_checker_catches_drift():
    """The checker itself: renames, kind changes, default changes and undocumented extras all count."""
    doc = _expected("(a, b, *, c=1.0, d='x')")
    assert signature_mismatches(doc, _expected("(a, b, *, c=1.0, d='x', e=None)")) == []
    assert signature_mismatches(doc, _expected("(a, bb, *, c=1.0, d='x')"))
    assert signature_mismatches(doc, _expected("(a, b, c=1.0, *, d='x')"))
    assert signature_mismatches(doc, _expected("(a, b, *, c=1, d='x')"))
    assert signature_mismatches(doc, _expected("(a, b, e=None, *, c=1.0, d='x')"))
    assert signature_mismatches(doc, _expected("(a, b, *, c=1.0, d='x', e)"))


def test_model_save_and_load_take_a_directory():
    """``save_pretrained(dir)`` / ``RewardModel.from_pretrained(dir)``: one positional directory argument,
    anything else optional. (API.md writes the parameter as ``dir``; a placeholder, checked positionally.)"""
    from fastrlhf.models import RewardModel
    for fn, skip in ((RewardModel.save_pretrained, 1), (RewardModel.from_pretrained, 0)):
        params = list(inspect.signature(fn).parameters.values())[skip:]
        assert params and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        assert all(p.default is not p.empty or p.kind in variadic for p in params[1:])


@pytest.mark.parametrize("name", TRAINERS + CONFIGS)
def test_trainers_and_configs_importable_from_fastrlhf_trainers(name):
    trainers = importlib.import_module("fastrlhf.trainers")
    assert hasattr(trainers, name), (
        f"fastrlhf.trainers does not export {name} (API.md 'Trainers, configs, command line'); "
        "it is defined in a submodule only")


def _trainer_module(name):
    module = next(m for k, m in (("SFT", "sft"), ("Reward", "reward"), ("PPO", "ppo")) if name.startswith(k))
    return importlib.import_module(f"fastrlhf.trainers.{module}")


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_are_frozen_dataclasses_with_documented_fields(name):
    cls = getattr(_trainer_module(name), name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    fields = {f.name for f in dataclasses.fields(cls)}
    required = {"model", "data", "output_dir"} | ({"reward_model"} if name == "PPOConfig" else set())
    assert required <= fields, f"{name} lacks {sorted(required - fields)}"


@pytest.mark.parametrize("name", TRAINERS)
def test_trainers_have_train(name):
    cls = getattr(_trainer_module(name), name)
    assert inspect.isclass(cls) and callable(getattr(cls, "train", None))
    assert list(inspect.signature(cls.train).parameters) == ["self"]


# ---------------------------------------------------------------- command line

def test_cli_demo_flags_reach_run_demo_cli(monkeypatch, tmp_path):
    import fastrlhf.demo
    from fastrlhf.cli import main
    seen = []
    monkeypatch.setattr(fastrlhf.demo, "run_demo_cli", lambda args: seen.append(args) or 0)
    assert main(["demo", "--out", str(tmp_path), "--quick", "--seed", "7", "--rollout", "vllm"]) == 0
    assert main(["demo"]) == 0
    full, default = seen
    assert (full.out, full.quick, full.seed, full.rollout) == (str(tmp_path), True, 7, "vllm")
    assert (default.quick, default.seed, default.rollout) == (False, 0, "hf")
    with pytest.raises(SystemExit) as err:
        main(["demo", "--rollout", "bogus"])
    assert err.value.code == 2


@pytest.mark.parametrize(("command", "module"), [("sft", "fastrlhf.trainers.sft"),
                                                 ("rm", "fastrlhf.trainers.reward"),
                                                 ("ppo", "fastrlhf.trainers.ppo")])
def test_cli_train_commands_pass_config_and_overrides(monkeypatch, command, module):
    from fastrlhf.cli import main
    seen = []
    monkeypatch.setattr(importlib.import_module(module), "cli_main",
                        lambda path, overrides: seen.append((path, list(overrides))) or 0)
    assert main([command, "--config", "run.yaml", "lr=1e-5", "kl.target=6"]) == 0
    assert seen == [("run.yaml", ["lr=1e-5", "kl.target=6"])]
    with pytest.raises(SystemExit):  # --config is required
        main([command])


def test_cli_report_passes_run_dir(monkeypatch):
    import fastrlhf.telemetry.report
    from fastrlhf.cli import main
    seen = []
    monkeypatch.setattr(fastrlhf.telemetry.report, "report_cli", lambda run_dir: seen.append(run_dir) or 0)
    assert main(["report", "runs/x"]) == 0 and seen == ["runs/x"]


def test_python_dash_m_fastrlhf_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "fastrlhf", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "sft", "rm", "ppo", "report"):
        assert command in out.stdout


def test_console_script_points_at_cli_main():
    """Installed metadata, else pyproject.toml (the GPU machine runs from the repo, not installed)."""
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        entries = distribution("fastrlhf").entry_points
        scripts = {e.name: e.value for e in entries if e.group == "console_scripts"}
    except PackageNotFoundError:
        tomllib = pytest.importorskip("tomllib")
        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("fastrlhf") == "fastrlhf.cli:main"


# ---------------------------------------------------------------- conventions, one small case per op

B, T, H, V = 3, 5, 8, 11


def _mask():
    """Ragged, left-padded, with a hole, and one row without any valid token."""
    return torch.tensor([[0, 1, 1, 1, 1], [1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)


def _garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN, inf, -inf cycled into every masked-out position (all trailing dims).

    A ``where``, not a copy: gradients still reach ``x`` at the valid positions.
    """
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    idx = torch.arange(mask.numel()).view(mask.shape) % 3
    junk = junk[idx].view(*mask.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.where(_valid_like(x, mask), x, junk)


def _inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    mask = _mask()
    labels = torch.randint(0, V, (B, T), generator=g)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return dict(mask=mask, labels=labels, labels_tok=labels.masked_fill(~mask, -100),
                hidden=rand(B, T, H), weight=rand(V, H, scale=0.3), logits=rand(B, T, V),
                lp=-rand(B, T).abs(), old=-rand(B, T).abs(), ref=-rand(B, T).abs(), adv=rand(B, T),
                values=rand(B, T), returns=rand(B, T), rewards=rand(B, T))


PER_TOKEN = ("hidden", "logits", "lp", "old", "ref", "adv", "values", "returns", "rewards")


def _dirty(d: dict) -> dict:
    """``d`` with NaN/inf in every per-token float input and out-of-range labels at masked-out positions.
    (``labels_tok`` keeps -100 there: for token_logprobs ``ignore_index`` is what marks padding.)"""
    out = {**d, **{k: _garbage(d[k], d["mask"]) for k in PER_TOKEN}}
    out["labels"] = d["labels"].masked_fill(~d["mask"], 10**6 + 7)
    return out


def _tensors(out):
    return [x for x in (out if isinstance(out, tuple) else (out,)) if isinstance(x, torch.Tensor)]


def _ops():
    """op name -> callable(inputs) -> output (tensor or tuple), each a plain API.md call."""
    import fastrlhf.kernels as K

    import fastrlhf.algo as A
    ppo_kw = dict(kl_coef=0.1, entropy_coef=0.01, clip_high=0.28, dual_clip=3.0)
    return {
        "token_logprobs": lambda d: K.token_logprobs(d["logits"], d["labels_tok"], return_entropy=True),
        "linear_token_logprobs": lambda d: K.linear_token_logprobs(
            d["hidden"], d["weight"], d["labels_tok"], return_entropy=True, chunk_size=4),
        "masked_mean": lambda d: K.masked_mean(d["values"], d["mask"]),
        "masked_var": lambda d: K.masked_var(d["values"], d["mask"]),
        "masked_whiten": lambda d: K.masked_whiten(d["values"], d["mask"]),
        "gae": lambda d: K.gae(d["rewards"], d["values"], d["mask"]),
        "ppo_policy_loss": lambda d: K.ppo_policy_loss(d["lp"], d["old"], d["adv"], d["mask"], dual_clip=3.0),
        "ppo_value_loss": lambda d: K.ppo_value_loss(d["values"], d["old"], d["returns"], d["mask"]),
        "fused_ppo_loss": lambda d: K.fused_ppo_loss(
            d["hidden"], d["weight"], d["labels"], d["old"], d["adv"], d["mask"], ref_logprobs=d["ref"],
            chunk_size=4, loss_agg="seq-mean-token-mean", **ppo_kw),
        "fused_ppo_loss_from_logits": lambda d: K.fused_ppo_loss_from_logits(
            d["logits"], d["labels"], d["old"], d["adv"], d["mask"], ref_logprobs=d["ref"],
            loss_agg="seq-mean-token-sum", **ppo_kw),
        "token_rewards": lambda d: A.token_rewards(
            torch.tensor([1.0, -2.0, 0.5]), d["lp"], d["ref"], d["mask"], kl_coef=0.1),
    }


OPS = tuple(_ops())


@pytest.mark.parametrize("op", OPS)
def test_bf16_inputs_give_float32_outputs(op):
    out = _ops()[op](_inputs(torch.bfloat16))
    tensors = _tensors(out)
    assert tensors
    for t in tensors:
        assert t.dtype == torch.float32, f"{op}: output dtype {t.dtype}"
    if isinstance(out, tuple) and isinstance(out[-1], dict):
        _check_stats(out[-1])


def test_kl_estimate_bf16_gives_float32():
    from fastrlhf.kernels import kl_estimate
    d = _inputs(torch.bfloat16)
    for kind in ("k1", "k2", "k3", "abs"):
        assert kl_estimate(d["lp"], d["ref"], kind).dtype == torch.float32


def _check_stats(stats, required=()):
    assert isinstance(stats, dict)
    assert set(required) <= set(stats), f"stats lack {sorted(set(required) - set(stats))}"
    for k, v in stats.items():
        assert isinstance(v, torch.Tensor), f"stats[{k!r}] is {type(v).__name__}, not a tensor"
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad, (
            f"stats[{k!r}]: dim {v.dim()}, {v.dtype}, requires_grad={v.requires_grad}")


def test_stats_are_detached_0dim_float32_with_documented_keys():
    import fastrlhf.kernels as K
    d = _inputs(torch.bfloat16)
    lp = d["lp"].float().requires_grad_()
    hidden = d["hidden"].requires_grad_()
    logits = d["logits"].requires_grad_()
    policy = ("clipfrac", "approx_kl", "ratio_mean")
    _, stats = K.ppo_policy_loss(lp, d["old"], d["adv"], d["mask"])
    _check_stats(stats, policy)
    _, stats = K.ppo_value_loss(d["values"].requires_grad_(), d["old"], d["returns"], d["mask"])
    _check_stats(stats, ("vf_clipfrac",))
    kw = dict(ref_logprobs=d["ref"], kl_coef=0.1)
    _, stats = K.fused_ppo_loss(hidden, d["weight"], d["labels"], d["old"], d["adv"], d["mask"], **kw)
    _check_stats(stats, policy + ("kl", "entropy"))
    _, stats = K.fused_ppo_loss_from_logits(logits, d["labels"], d["old"], d["adv"], d["mask"], **kw)
    _check_stats(stats, policy + ("kl", "entropy"))


def test_return_logprobs_gives_three_tuple_with_detached_logprobs():
    import fastrlhf.kernels as K
    d = _inputs(torch.bfloat16)
    hidden, logits = d["hidden"].requires_grad_(), d["logits"].requires_grad_()
    for out in (K.fused_ppo_loss(hidden, d["weight"], d["labels"], d["old"], d["adv"], d["mask"],
                                 return_logprobs=True),
                K.fused_ppo_loss_from_logits(logits, d["labels"], d["old"], d["adv"], d["mask"],
                                             return_logprobs=True)):
        assert isinstance(out, tuple) and len(out) == 3
        loss, stats, lp = out
        assert loss.dim() == 0 and loss.requires_grad and isinstance(stats, dict)
        assert lp.shape == (B, T) and lp.dtype == torch.float32 and not lp.requires_grad
    plain = K.fused_ppo_loss(hidden, d["weight"], d["labels"], d["old"], d["adv"], d["mask"])
    assert isinstance(plain, tuple) and len(plain) == 2


GRAD_LEAVES = ("logits", "hidden", "weight", "lp", "values")


# triton < 3.7's interpreter turns integer kernel arguments into 1-element numpy arrays and calls int() on
# them in range(); numpy >= 2.4 refuses that (triton-lang/triton#9171). The GPU machine has triton 3.6 with
# numpy 2.5, so there the interpreter cannot run at all; its compiled path is covered by the gpu tests.
_TRITON_9171 = "only 0-dimensional arrays can be converted"


def _use_interpreter(monkeypatch):
    """Set TRITON_INTERPRET=1, or skip (with the reason) where this triton + numpy cannot interpret."""
    import fastrlhf.kernels as K
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the PyTorch path is the only one here)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        K.gae(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), backend="triton")
    except Exception as err:  # noqa: BLE001 - only the known incompatibility skips, anything else fails
        if _TRITON_9171 not in str(err):
            raise
        import numpy
        import triton
        pytest.skip(f"the Triton interpreter of triton {triton.__version__} cannot run with numpy "
                    f"{numpy.__version__} (triton-lang/triton#9171)")


# Each op on its default path; the Triton ops also through the Triton interpreter (backend="auto" picks
# Triton for CPU tensors under TRITON_INTERPRET=1, API.md).
GARBAGE_CASES = [(op, False) for op in OPS] + [(op, True) for op in OPS if op in
                                                ("token_logprobs", "linear_token_logprobs", "gae",
                                                 "fused_ppo_loss", "fused_ppo_loss_from_logits")]


@pytest.mark.parametrize(("op", "interpret"), GARBAGE_CASES,
                         ids=[f"{op}-{'triton_interpret' if i else 'default'}" for op, i in GARBAGE_CASES])
def test_results_ignore_nan_garbage_at_masked_positions(op, interpret, monkeypatch):
    """Same values on valid positions (and 0 where API.md says so), and the same finite gradients,
    whether masked-out positions hold clean numbers or NaN/inf."""
    if interpret:
        _use_interpreter(monkeypatch)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mask = _mask()
    results, grads = [], []
    for garbage in (False, True):
        d = _inputs(torch.float32)
        for k in GRAD_LEAVES:
            d[k].requires_grad_()
        out = _ops()[op](_dirty(d) if garbage else d)
        tensors = _tensors(out)
        stats = out[-1] if isinstance(out, tuple) and isinstance(out[-1], dict) else {}
        results.append([t.detach() for t in tensors] + [stats[k] for k in sorted(stats)])
        upstream = [torch.arange(t.numel()).view(t.shape) % 3 + 1.0 for t in tensors]  # not all ones
        loss = sum((t * u).where(_valid_like(t, mask), 0.0).sum()
                   for t, u in zip(tensors, upstream, strict=True) if t.requires_grad)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        grads.append({k: d[k].grad for k in GRAD_LEAVES if d[k].grad is not None})
    for clean, dirty in zip(*results, strict=True):
        valid = _valid_like(clean, mask)
        assert torch.isfinite(dirty[valid]).all(), f"{op}: non-finite output on valid positions"
        torch.testing.assert_close(dirty.where(valid, 0.0), clean.where(valid, 0.0),
                                   msg=f"{op}: output changed")
        if clean.dim() >= 2:  # per-token outputs are 0 at masked-out positions (API.md)
            assert (dirty[~valid] == 0).all() and (clean[~valid] == 0).all(), f"{op}: masked-out output not 0"
    for k, g_clean in grads[0].items():
        g_dirty = grads[1][k]
        keep = _valid_like(g_clean, mask) if k != "weight" else torch.ones_like(g_clean, dtype=torch.bool)
        assert torch.isfinite(g_dirty[keep]).all(), f"{op}: non-finite gradient for {k}"
        torch.testing.assert_close(g_dirty.where(keep, 0.0), g_clean.where(keep, 0.0), msg=f"{op}: grad {k}")


def _valid_like(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` broadcast to ``t`` when ``t`` is per token ([B, T] or [B, T, ...]); all True otherwise."""
    if t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
        return mask.view(*mask.shape, *([1] * (t.dim() - 2))).expand_as(t)
    return torch.ones_like(t, dtype=torch.bool)


TRITON_OPS = ("token_logprobs", "linear_token_logprobs", "gae", "fused_ppo_loss",
              "fused_ppo_loss_from_logits")


def _call_with_backend(op, backend):
    import fastrlhf.kernels as K
    d = _inputs(torch.float32)
    if op == "token_logprobs":
        return K.token_logprobs(d["logits"], d["labels"], backend=backend)
    if op == "linear_token_logprobs":
        return K.linear_token_logprobs(d["hidden"], d["weight"], d["labels"], backend=backend)
    if op == "gae":
        return K.gae(d["rewards"], d["values"], d["mask"], backend=backend)
    if op == "fused_ppo_loss":
        return K.fused_ppo_loss(d["hidden"], d["weight"], d["labels"], d["old"], d["adv"], d["mask"],
                                backend=backend)
    return K.fused_ppo_loss_from_logits(d["logits"], d["labels"], d["old"], d["adv"], d["mask"],
                                        backend=backend)


@pytest.mark.parametrize("op", TRITON_OPS)
def test_unknown_backend_raises_value_error(op):
    with pytest.raises(ValueError, match="backend"):
        _call_with_backend(op, "bogus")


@pytest.mark.parametrize("op", TRITON_OPS)
def test_triton_backend_on_cpu_without_interpreter_is_clear(op, monkeypatch):
    """Either a clear error naming the way out (CUDA / TRITON_INTERPRET / backend='torch'), or the same
    result as the PyTorch path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        out = _call_with_backend(op, "triton")
    except (RuntimeError, NotImplementedError, ValueError) as err:
        msg = str(err)
        assert "TRITON_INTERPRET" in msg or "CUDA" in msg or "backend" in msg, f"{op}: unclear error {msg!r}"
        return
    ref = _call_with_backend(op, "torch")
    for a, b in zip(_tensors(out), _tensors(ref), strict=True):
        torch.testing.assert_close(a, b)


def test_auto_backend_on_cpu_without_interpreter_is_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for op in TRITON_OPS:
        for a, b in zip(_tensors(_call_with_backend(op, "auto")),
                        _tensors(_call_with_backend(op, "torch")), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("op", TRITON_OPS)
def test_triton_path_computes_the_torch_function(op, monkeypatch):
    """"Both paths compute the same function": backend="triton" under the interpreter vs backend="torch"."""
    _use_interpreter(monkeypatch)
    out, ref = _call_with_backend(op, "triton"), _call_with_backend(op, "torch")
    for a, b in zip(_tensors(out), _tensors(ref), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if isinstance(out, tuple) and isinstance(out[-1], dict):
        _check_stats(out[-1], ref[-1].keys())
        for k in ref[-1]:
            torch.testing.assert_close(out[-1][k], ref[-1][k], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- algo, data, models: shapes and types

def test_algo_return_conventions():
    import fastrlhf.algo as A
    chosen = torch.tensor([1.0, 0.5, -1.0], dtype=torch.bfloat16)
    rejected = torch.tensor([0.0, 1.0, -2.0], dtype=torch.bfloat16)
    out = A.bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.1, 0.0, 0.2]))
    assert isinstance(out, tuple) and len(out) == 3
    assert all(t.dim() == 0 and t.dtype == torch.float32 for t in out)
    assert A.expected_calibration_error(chosen, rejected).dtype == torch.float32
    assert A.normalize_rewards(chosen, mode="batch", clip=1.0).dtype == torch.float32
    controllers = (A.FixedKLController(0.1), A.AdaptiveKLController(0.1, 6.0, 10_000),
                   A.StepKLController(0.1, 6.0))
    for ctl in controllers:
        ctl.update(12.0, 64)
        assert isinstance(ctl.value, float)


def test_data_features_keys():
    from fastrlhf.data import build_test_tokenizer, chat_sft_features, sft_features
    tok = build_test_tokenizer()
    for feats in (sft_features("repeat a b :", "a b", tok),
                  chat_sft_features([{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}], tok)):
        assert {"input_ids", "labels", "attention_mask"} <= set(feats)
        assert len(feats["input_ids"]) == len(feats["labels"]) == len(feats["attention_mask"])


def test_models_output_shapes_and_float32_for_bf16_backbone():
    from fastrlhf.models import RewardModel, ValueModel, tiny_llama
    ids = torch.randint(3, 50, (2, 6))
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    scores = RewardModel(tiny_llama(50).to(torch.bfloat16))(ids, attn)
    values = ValueModel(tiny_llama(50).to(torch.bfloat16))(ids, attn)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert values.shape == (2, 6) and values.dtype == torch.float32

"""`fastrlhf demo`: SFT -> reward model -> PPO on the built-in task (``fastrlhf.data.demo_task``).

No downloads: tokenizer, models and data are built in-process from a seed.

Stages, each written under ``--out`` and skipped when already complete (re-running resumes):

    sft/   a tiny Llama (hidden 64, 2 layers, 2 heads of 32) trained from scratch on mediocre
           demonstrations (SFTTrainer); ``sft/final`` is an HF checkpoint with its tokenizer
    rm/    preference pairs of SFT samples labelled by a noisy Bradley-Terry draw on the hidden
           gold score; a RewardModel initialised from the SFT policy; held-out accuracy and ECE
    ppo/   PPOTrainer against the reward model (checkpoints, resume)

Then the SFT policy and the PPO policy are evaluated on the same held-out prompts with the same
sampling seed: gold reward, RM score, response length and KL(PPO || SFT) per sequence (the sum over
the response of log pi(y_t) - log pi_SFT(y_t) on sampled tokens, averaged over prompts: an unbiased
estimate of the sequence-level KL). The KL target (6 nats per sequence, the seed's default) is held
by Ziegler's adaptive controller; answers are capped at ``MAX_WORDS + 1`` tokens so the policy cannot
leave the length range the reward model was trained on.

``summary.json`` has nested sections (API.md's "rm.heldout_accuracy" = ``summary["rm"]["heldout_accuracy"]``).
``rm``: ``heldout_accuracy`` (against the noisy held-out labels), ``heldout_gold_accuracy`` (against
the gold order), ``ece``, ``heldout_pairs``, ``train_pairs``; ``ppo``: ``gold_reward_before`` /
``_after`` / ``_max``, ``gap_closed``, ``rm_score_before`` / ``_after``, ``length_before`` / ``_after``,
``kl_final``, ``kl_target``, ``kl_definition``, ``iterations``; ``world_size``, ``rollout``, ``quick``,
``lora`` (``--lora``: PPO trains LoRA adapters, the reference is the actor with adapters disabled),
``plots`` and ``seconds`` (wall time of this invocation: a resumed run counts only its own part).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrlhf.data import demo_task as task
from fastrlhf.trainers.ppo import derive_seed


def _local(runtime):
    """A one-process runtime on this rank's device: the demo trains SFT and RM on rank 0 alone."""
    from fastrlhf.engine.runtime import Runtime
    return Runtime(device=runtime.device)


@dataclass(frozen=True)
class DemoSettings:
    n_demos: int
    sft_epochs: int
    sft_lr: float
    n_pair_prompts: int
    rm_epochs: int
    rm_lr: float
    ppo_iterations: int
    n_eval_prompts: int = 1024
    sft_batch: int = 64
    rm_batch: int = 64
    heldout_frac: float = 0.2
    label_tau: float = 0.5
    max_new_tokens: int = 9


QUICK = DemoSettings(
    n_demos=4000, sft_epochs=6, sft_lr=3e-3, n_pair_prompts=6000, rm_epochs=4, rm_lr=1e-3, ppo_iterations=60
)
FULL = DemoSettings(
    n_demos=8000, sft_epochs=6, sft_lr=3e-3, n_pair_prompts=10000, rm_epochs=4, rm_lr=1e-3, ppo_iterations=150
)


def ppo_config(settings: DemoSettings, seed: int, rollout: str, output_dir: Path):
    """The demo's PPO settings: a tiny model from scratch takes far larger learning rates than the
    production defaults (1e-6 range), and the KL target (nats per sequence) is set for 12-token answers."""
    from fastrlhf.trainers.ppo import EarlyStopConfig, KLConfig, PPOConfig, RolloutConfig

    return PPOConfig(
        output_dir=str(output_dir),
        seed=seed,
        iterations=settings.ppo_iterations,
        rollout_batch_size=64,
        minibatch_size=32,
        ppo_epochs=4,
        actor_lr=3e-4,
        critic_lr=1e-3,
        reward_norm="running",
        reward_clip=5.0,
        entropy_coef=0.0,
        checkpoint_every=10,
        tensorboard=False,
        rollout=RolloutConfig(backend=rollout, max_new_tokens=settings.max_new_tokens, temperature=1.0),
        kl=KLConfig(controller="adaptive", init_coef=0.1, target=6.0, horizon=500),
        early_stop=EarlyStopConfig(kl_factor=2.0, length_factor=2.0, score_falling_iters=20),
    )


@contextlib.contextmanager
def _single_thread():
    # The models are tiny: thread hand-offs cost more than the matmuls, and on a shared 2-core machine
    # OpenMP spin-waits make a 2-thread run tens of times slower. One thread, restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _say(runtime, msg: str) -> None:
    if runtime.is_main:
        print(f"[demo] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- SFT
def stage_sft(out: Path, s: DemoSettings, tok, runtime, seed: int) -> Path:
    from fastrlhf.models import tiny_llama
    from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

    final = out / "sft" / "final"
    if runtime.is_main and not (out / "sft" / "sft_result.json").is_file():
        rows = task.make_demonstrations(s.n_demos, seed)
        model = tiny_llama(
            len(tok),
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            intermediate_size=128,
            seed=seed,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        # model / data name the in-memory objects passed below (SFTConfig requires both keys)
        cfg = SFTConfig(
            model="demo:tiny_llama",
            data="demo:demonstrations",
            output_dir=str(out / "sft"),
            lr=s.sft_lr,
            epochs=s.sft_epochs,
            batch_size=s.sft_batch,
            micro_batch_size=s.sft_batch,
            max_length=32,
            seed=seed,
            precision="fp32",
            device=str(runtime.device),
            lr_scheduler="cosine",
            warmup_ratio=0.05,
            progress=False,
            tensorboard=False,
            loss_impl="fused",
        )
        result = SFTTrainer(cfg, model=model, tokenizer=tok, train_rows=rows, runtime=_local(runtime)).train()
        _say(runtime, f"SFT done: {result}")
    runtime.barrier()
    return final


def load_policy(path: Path):
    from fastrlhf.models import load_causal_lm

    return load_causal_lm(path)


# --------------------------------------------------------------------------------------------- sampling
def sample(model, tok, prompts: list[str], *, seed: int, max_new_tokens: int, batch: int = 128):
    """Responses (text, special tokens dropped) and token ids for ``prompts`` with ``HFRollout``."""
    from fastrlhf.rollout.base import SamplingParams
    from fastrlhf.rollout.hf import HFRollout

    engine = HFRollout(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    texts, tokens = [], []
    for k in range(0, len(ids), batch):
        params = SamplingParams(max_new_tokens=max_new_tokens, seed=derive_seed(seed, "sample", k))
        gen = engine.generate(ids[k : k + batch], params)
        tokens += gen.token_ids
        texts += [tok.decode(t, skip_special_tokens=True) for t in gen.token_ids]
    return texts, tokens


# ------------------------------------------------------------------------------------------ reward model
def _encode_pair_side(tok, prompts, responses):
    """prompt + response + EOS (what the policy generates; an empty response is EOS alone), right-padded."""
    from fastrlhf.data import pad_batch

    seqs = [
        tok(p, add_special_tokens=False)["input_ids"]
        + tok(r, add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
        for p, r in zip(prompts, responses, strict=True)
    ]
    batch = pad_batch(
        [{"input_ids": x, "attention_mask": [1] * len(x)} for x in seqs],
        tok.pad_token_id,
        padding_side="right",
    )
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def score_texts(rm, tok, prompts, responses, batch: int = 256) -> torch.Tensor:
    out = []
    for k in range(0, len(prompts), batch):
        ids, mask = _encode_pair_side(tok, prompts[k : k + batch], responses[k : k + batch])
        out.append(rm(ids.to(rm.head.weight.device), mask.to(rm.head.weight.device)).float().cpu())
    return torch.cat(out)


def make_pairs(sft_model, tok, s: DemoSettings, seed: int):
    prompts = task.make_prompts(s.n_pair_prompts, seed + 2)
    a, _ = sample(sft_model, tok, prompts, seed=derive_seed(seed, "pairs-a"), max_new_tokens=s.max_new_tokens)
    b, _ = sample(sft_model, tok, prompts, seed=derive_seed(seed, "pairs-b"), max_new_tokens=s.max_new_tokens)
    # an answer that is EOS alone decodes to "": preference rows need text on both sides
    keep = [i for i in range(len(prompts)) if a[i].strip() and b[i].strip()]
    pairs = task.label_pairs(
        [prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep], tau=s.label_tau, seed=seed
    )
    n_held = int(len(pairs) * s.heldout_frac)
    return pairs[n_held:], pairs[:n_held]


def evaluate_reward_model(rm, tok, pairs) -> dict:
    from fastrlhf.algo import expected_calibration_error

    prompts = [p.prompt for p in pairs]
    chosen = score_texts(rm, tok, prompts, [p.chosen for p in pairs])
    rejected = score_texts(rm, tok, prompts, [p.rejected for p in pairs])
    gold_order = torch.tensor([p.gold_chosen > p.gold_rejected for p in pairs])
    agree = (chosen > rejected) == gold_order
    return {
        "heldout_accuracy": float((chosen > rejected).float().mean()),
        "heldout_gold_accuracy": float(agree.float().mean()),
        "ece": float(expected_calibration_error(chosen, rejected)),
        "heldout_pairs": len(pairs),
        "chosen_scores": chosen.tolist(),
        "rejected_scores": rejected.tolist(),
    }


def _rows(pairs) -> list[dict]:
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


def stage_rm(out: Path, s: DemoSettings, tok, runtime, seed: int, sft_dir: Path) -> tuple[Path, dict]:
    """Label pairs of SFT samples, train the reward model (RewardTrainer), evaluate it on held-out pairs."""
    from fastrlhf.models import RewardModel
    from fastrlhf.trainers.reward import RewardConfig, RewardTrainer

    final, result_path = out / "rm" / "final", out / "rm" / "demo_rm_result.json"
    if runtime.is_main and not result_path.is_file():
        train_pairs, held = make_pairs(load_policy(sft_dir).eval(), tok, s, seed)
        _say(runtime, f"reward model: {len(train_pairs)} train / {len(held)} held-out labelled pairs")
        # model / data name the in-memory objects passed below (RewardConfig requires both keys)
        cfg = RewardConfig(
            model="demo:sft-policy",
            data="demo:pairs",
            output_dir=str(out / "rm"),
            lr=s.rm_lr,
            epochs=s.rm_epochs,
            batch_size=s.rm_batch,
            micro_batch_size=s.rm_batch,
            max_length=32,
            warmup_ratio=0.05,
            use_margin=False,
            seed=seed,
            precision="fp32",
            device=str(runtime.device),
            progress=False,
            tensorboard=False,
        )
        trained = RewardTrainer(
            cfg,
            model=load_policy(sft_dir),
            tokenizer=tok,
            train_rows=_rows(train_pairs),
            eval_rows=_rows(held),
            runtime=_local(runtime),
        ).train()
        result = {
            **evaluate_reward_model(RewardModel.from_pretrained(final).eval(), tok, held),
            "train_pairs": len(train_pairs),
            "trainer_eval_accuracy": trained.get("eval_accuracy"),
        }
        _write_json(result_path, result)
    runtime.barrier()
    return final, json.loads(result_path.read_text())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------- PPO
# ``--lora``: the PPO stage trains LoRA adapters (actor and critic; SFT and RM stay full fine-tuning) with
# the reference = the actor with its adapters disabled; adapters take larger learning rates than full weights.
LORA = dict(lora_rank=16, lora_alpha=32.0, actor_lr=2e-3, critic_lr=3e-3)


def stage_ppo(out: Path, s: DemoSettings, tok, runtime, seed: int, sft_dir: Path, rm_dir: Path, rollout: str,
              algo: str = "ppo", lora: bool = False):
    from fastrlhf.demo_algos import rl_config, stage_dir, stage_dpo
    from fastrlhf.models import RewardModel, ValueModel
    from fastrlhf.trainers.ppo import PPOTrainer

    if algo == "dpo":  # offline: DPO on the reward model's labelled pairs replaces the RL stage
        return stage_dpo(out, s, tok, runtime, seed, sft_dir, rm_dir, rollout)
    cfg = rl_config(ppo_config(s, seed, rollout, stage_dir(out, algo)), algo)
    if lora:
        import dataclasses
        cfg = dataclasses.replace(cfg, **LORA)
    trainer = PPOTrainer(
        cfg,
        actor=load_policy(sft_dir),
        ref=None if lora else load_policy(sft_dir),
        reward_model=RewardModel.from_pretrained(rm_dir),
        critic=ValueModel.from_pretrained(rm_dir) if cfg.advantage_estimator == "gae" else None,
        tokenizer=tok,
        prompts=task.make_prompts(2048, seed + 3),
        runtime=runtime,
        gold_fn=task.gold_reward,
    )
    trainer.train()
    trainer.finish()  # ppo/final, ppo/critic, ppo/ppo_result.json, ppo/plots
    return trainer


@torch.no_grad()
def evaluate_policies(trainer, tok, s: DemoSettings, seed: int) -> dict:
    """Gold reward, RM score, length of the SFT (reference) and PPO policies on the same held-out prompts;
    KL(PPO || SFT) per sequence on the PPO policy's samples."""
    from fastrlhf.trainers.ppo_batch import build_batch

    prompts = task.make_prompts(s.n_eval_prompts, seed + 4)
    result = {}
    for name, policy in (("before", trainer.ref), ("after", trainer.actor)):
        base = policy is None  # LoRA: the SFT policy is the actor with its adapters disabled
        policy = trainer.actor if base else policy
        policy.eval()
        with _reference(trainer, base):
            texts, tokens = sample(
                policy, tok, prompts, seed=derive_seed(seed, "eval"), max_new_tokens=s.max_new_tokens
            )
        gold = [task.gold_reward(p, t) for p, t in zip(prompts, texts, strict=True)]
        rm = score_texts(trainer.reward_model, tok, prompts, texts)
        result[name] = {
            "gold": sum(gold) / len(gold),
            "rm": float(rm.mean()),
            "length": sum(len(t) for t in tokens) / len(tokens),
            "gold_all": gold,
            "rm_all": rm.tolist(),
        }
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    from fastrlhf.rollout.base import Generation

    batch = build_batch(
        ids,
        Generation(tokens, [[0.0] * len(t) for t in tokens]),
        pad_token_id=tok.pad_token_id,
        device=trainer.runtime.device,
    )
    lp, _, _ = trainer.actor(
        batch.input_ids, batch.attention_mask, mode="logprobs", prompt_len=batch.prompt_len
    )
    with _reference(trainer, trainer.ref is None):
        ref, _, _ = (trainer.ref or trainer.actor)(
            batch.input_ids, batch.attention_mask, mode="logprobs", prompt_len=batch.prompt_len
        )
    result["kl"] = float(torch.where(batch.mask, lp - ref, torch.zeros_like(lp)).sum(-1).mean())
    return result


def _reference(trainer, base: bool):
    """Inside: ``trainer.actor`` computes the SFT policy when ``base`` (LoRA adapters disabled)."""
    if not base:
        return contextlib.nullcontext()
    from fastrlhf.models.lora import adapters_disabled
    return adapters_disabled(trainer.actor)


# ------------------------------------------------------------------------------------------- reporting
def collect_metrics(out: Path, rl_stage: str = "ppo") -> None:
    """``out/metrics.jsonl``: the stages' rows (sft, rm, ppo) in order, rebuilt on every run."""
    lines = []
    for part in ("sft", "rm", rl_stage):
        path = out / part / "metrics.jsonl"
        if path.is_file():
            lines += [line for line in path.read_text().splitlines() if line.strip()]
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(out / "metrics.jsonl")


def make_plots(out: Path, rm_result: dict, evals: dict, rl_stage: str = "ppo") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastrlhf.telemetry.metrics import read_metrics

    path = out / rl_stage / "metrics.jsonl"  # DPO has no RL rows: empty curves
    rows = [r for r in read_metrics(path) if r.get("stage") == "ppo" and "kl" in r] if path.is_file() else []
    written = []
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = (
        ("rm_score", "RM score"),
        ("gold_reward", "gold reward"),
        ("kl", "KL to SFT (nats / seq)"),
        ("response_length", "response length (tokens)"),
        ("entropy", "policy entropy (nats / token)"),
        ("kl_coef", "KL coefficient"),
    )
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows])
        if key == "gold_reward":
            ax.axhline(task.GOLD_MAX, ls="--", c="gray", label="gold max")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
    fig.tight_layout()
    fig.savefig(out / "ppo_curves.png", dpi=80)
    written.append("ppo_curves.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(rm_result["chosen_scores"], bins=30, alpha=0.6, label="chosen")
    ax.hist(rm_result["rejected_scores"], bins=30, alpha=0.6, label="rejected")
    ax.set_title("reward model on held-out pairs")
    ax.legend()
    fig.savefig(out / "rm_chosen_vs_rejected.png", dpi=80)
    written.append("rm_chosen_vs_rejected.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("before", "after"):
        ax.scatter(
            evals[name]["rm_all"],
            evals[name]["gold_all"],
            s=8,
            alpha=0.4,
            label=f"{'SFT' if name == 'before' else 'PPO'} samples",
        )
    ax.set_xlabel("RM score")
    ax.set_ylabel("gold reward")
    ax.set_title("gold reward vs RM score (divergence = reward hacking)")
    ax.legend()
    fig.savefig(out / "gold_vs_rm.png", dpi=80)
    written.append("gold_vs_rm.png")
    plt.close("all")
    return written


def build_summary(
    rm_result: dict, evals: dict, cfg, runtime, rollout: str, seconds: float, quick: bool, lora: bool = False
) -> dict:
    before, after = evals["before"]["gold"], evals["after"]["gold"]
    gap = task.GOLD_MAX - before
    return {
        "rm": {k: v for k, v in rm_result.items() if not isinstance(v, list)},
        "ppo": {
            "gold_reward_before": before,
            "gold_reward_after": after,
            "gold_reward_max": task.GOLD_MAX,
            "gap_closed": (after - before) / gap if gap > 0 else float("nan"),
            "rm_score_before": evals["before"]["rm"],
            "rm_score_after": evals["after"]["rm"],
            "length_before": evals["before"]["length"],
            "length_after": evals["after"]["length"],
            "kl_final": evals["kl"],
            "kl_target": cfg.kl.target,
            "kl_definition": "mean over held-out prompts of sum_t log pi_PPO(y_t) - log pi_SFT(y_t), "
            "y sampled from pi_PPO (nats per sequence)",
            "iterations": cfg.iterations,
        },
        "world_size": runtime.world_size,
        "rollout": rollout,
        "quick": quick,
        "lora": lora,
        "seed": cfg.seed,
        "seconds": seconds,
        "memory_plan": runtime.scheduler.plan_dict(),
    }


def print_summary(summary: dict) -> None:
    p, r = summary["ppo"], summary["rm"]
    print("\n==== fastrlhf demo summary ====")
    print(
        f"reward model : held-out accuracy {r['heldout_accuracy']:.3f} (vs gold order "
        f"{r['heldout_gold_accuracy']:.3f}), ECE {r['ece']:.3f}"
    )
    print(
        f"gold reward  : SFT {p['gold_reward_before']:.3f} -> PPO {p['gold_reward_after']:.3f} "
        f"(max {p['gold_reward_max']:.1f}; {100 * p['gap_closed']:.1f}% of the gap closed)"
    )
    print(f"RM score     : {p['rm_score_before']:.3f} -> {p['rm_score_after']:.3f}")
    print(
        f"KL to SFT    : {p['kl_final']:.3f} nats/seq (target {p['kl_target']}, limit {2 * p['kl_target']})"
    )
    print(f"length       : {p['length_before']:.2f} -> {p['length_after']:.2f} tokens")
    print(
        f"time         : {summary['seconds']:.0f} s  (world size {summary['world_size']}, "
        f"rollout {summary['rollout']}{', PPO with LoRA' if summary.get('lora') else ''})\n",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------- entry
RUN_FILE = "demo_run.json"


def check_demo_run(out: Path, *, seed: int, quick: bool, rollout: str, write: bool = True,
                   lora: bool = False) -> None:
    """``out`` resumes only the run it holds: ``out/demo_run.json`` records ``--seed``, ``--quick`` and
    ``--rollout`` when a run starts; a re-run with other values is refused (``ConfigError`` naming the
    flags), as is a folder with stage outputs but no record. Use another ``--out`` for another run."""
    from fastrlhf.config import ConfigError

    mine = {"seed": seed, "quick": quick, "rollout": rollout, "lora": lora}
    path = out / RUN_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        saved.setdefault("lora", False)  # recorded before --lora existed
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        if diff:
            held = ", ".join(f"--{k} {saved.get(k)}" for k in diff)
            raise ConfigError(f"{out} holds a demo run with {held} (flags {diff} differ from this run); "
                              "use another --out, or the same flags to resume it")
    elif any((out / part).exists() for part in ("sft", "rm", "ppo")):
        raise ConfigError(f"{out} holds demo stages but no {RUN_FILE} recording their --seed/--quick; "
                          "use another --out")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(path, mine)


def run_demo(
    out: str | Path = "runs/demo", *, quick: bool = False, seed: int = 0, rollout: str = "hf",
    task_name: str = "preference", algo: str = "ppo", lora: bool = False,
) -> dict:
    """The whole pipeline; returns the summary dict (also written to ``out/summary.json``).
    ``task_name="arithmetic"`` runs ``fastrlhf.demo_algos.run_arithmetic``; ``algo`` other than ppo
    trains in ``out/<algo>`` next to ``out/ppo`` (SFT and reward model are shared)."""
    from fastrlhf.demo_algos import annotate_summary, run_arithmetic, stage_dir
    from fastrlhf.engine import runtime as rt

    if lora and (task_name != "preference" or algo == "dpo"):
        from fastrlhf.config import ConfigError
        raise ConfigError(f"--lora runs the preference task's RL stage; not --task {task_name} --algo {algo}")
    if task_name == "arithmetic":
        return run_arithmetic(out, algo=algo, quick=quick, seed=seed, rollout=rollout)

    start, out = time.time(), Path(out)
    s = QUICK if quick else FULL
    check_demo_run(out, seed=seed, quick=quick, rollout=rollout, write=False, lora=lora)
    runtime = rt.init_runtime()
    if runtime.is_main:
        check_demo_run(out, seed=seed, quick=quick, rollout=rollout, lora=lora)
    runtime.barrier()
    with _single_thread():
        tok = task.build_tokenizer()
        sft_dir = stage_sft(out, s, tok, runtime, seed)
        _say(runtime, "SFT policy ready")
        rm_dir, rm_result = stage_rm(out, s, tok, runtime, seed, sft_dir)
        _say(runtime, f"reward model ready: held-out accuracy {rm_result['heldout_accuracy']:.3f}")
        trainer = stage_ppo(out, s, tok, runtime, seed, sft_dir, rm_dir, rollout, algo, lora=lora)
        evals = evaluate_policies(trainer, tok, s, seed)
    summary = build_summary(rm_result, evals, trainer.config, runtime, rollout, time.time() - start, quick,
                            lora=lora)
    summary = annotate_summary(summary, algo=algo, task_name=task_name, trainer=trainer)
    if runtime.is_main:
        collect_metrics(out, stage_dir(out, algo).name)
        summary["plots"] = make_plots(out, rm_result, evals, stage_dir(out, algo).name)
        _write_json(out / "summary.json", summary)
        print_summary(summary)
    runtime.barrier()
    return summary


def run_demo_cli(args) -> int:
    # The demo saves a dozen tiny checkpoints; transformers' per-save progress bars would bury the
    # stage output (the command line owns its output, so it turns them off here, not run_demo).
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    import os

    from fastrlhf.trainers.guard import output_dir_lock

    out = Path(args.out)
    # refused before the lock is taken (a refused run must not touch --out)
    lora = bool(getattr(args, "lora", False))
    check_demo_run(out, seed=args.seed, quick=args.quick, rollout=args.rollout, write=False, lora=lora)
    with output_dir_lock(out, enabled=int(os.environ.get("RANK", "0")) == 0):
        run_demo(out, quick=args.quick, seed=args.seed, rollout=args.rollout,
                 task_name=getattr(args, "task", "preference"), algo=getattr(args, "algo", "ppo"), lora=lora)
    return 0

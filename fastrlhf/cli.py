"""`fastrlhf demo | arena | sft | rm | ppo | dpo | plan | report` (also `python -m fastrlhf`).

Each subcommand imports its module only when run, so `fastrlhf --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, function taking the parsed args, help)
_COMMANDS = {
    "sft": ("fastrlhf.trainers.sft", "cli_main", "supervised fine-tuning (loss on response tokens only)"),
    "rm": ("fastrlhf.trainers.reward", "cli_main", "reward model training (Bradley-Terry)"),
    "ppo": ("fastrlhf.trainers.ppo", "cli_main", "PPO against a reward model"),
    "dpo": ("fastrlhf.trainers.dpo", "cli_main", "direct preference optimization (DPO / IPO / SimPO)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrlhf", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole SFT -> RM -> PPO pipeline on the built-in task, no downloads")
    demo.add_argument("--out", default="runs/demo", help="output directory (re-running resumes)")
    demo.add_argument("--quick", action="store_true", help="CI-sized run (a few minutes on 2 CPU cores)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--rollout", choices=("hf", "vllm"), default="hf")
    demo.add_argument("--task", choices=("preference", "arithmetic"), default="preference",
                      help="preference (reward model, hidden gold score) or arithmetic (exact-answer reward)")
    demo.add_argument("--algo", choices=("ppo", "grpo", "rloo", "reinforce_pp", "dpo"), default="ppo")
    arena = sub.add_parser("arena", help="every algorithm on the preference task, same budget "
                                         "(arena.json, arena.png)")
    arena.add_argument("--out", default="runs/arena")
    arena.add_argument("--quick", action="store_true")
    arena.add_argument("--seed", type=int, default=0)
    arena.add_argument("--rollout", choices=("hf", "vllm"), default="hf")
    for name, (_, _, help_) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", required=True, help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides (dotted for sections)")
    plan = sub.add_parser("plan", help="memory per GPU and PPO phase for a config, without allocating")
    plan.add_argument("--config", required=True, help="PPO YAML config file")
    plan.add_argument("--model", default=None, help="a folder with a config.json (or a transformers model "
                      "type such as qwen2) replacing the config's model for planning")
    plan.add_argument("--gpus", type=int, default=1, help="ranks sharding the models (FSDP2)")
    plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB")
    rep = sub.add_parser("report", help="plots and a summary of a run's metrics")
    rep.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user error (config, data row, path, device, I/O such as a full or read-only
    disk) prints one line ``fastrlhf CMD: error: MESSAGE`` and returns 2, as argparse does for bad flags;
    a run that cannot go on (``RunError``, e.g. non-finite rewards) returns 1 the same way; Ctrl-C prints
    how to resume and returns 130. ``FASTRLHF_TRACEBACK=1`` re-raises instead. Nothing heavy is imported
    before the subcommand runs, so ``fastrlhf --help`` is fast."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if os.environ.get("FASTRLHF_TRACEBACK"):
            raise
        again = "the same command (same --out)" if args.command == "demo" else "the same command"
        print(f"fastrlhf {args.command}: interrupted; run {again} again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as err:
        code = _exit_code(err)
        if code is None or os.environ.get("FASTRLHF_TRACEBACK"):
            raise
        print(f"fastrlhf {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return code


def _exit_code(err: Exception) -> int | None:
    """2 for a user error, 1 for a run that cannot go on, None for a bug (the traceback is kept)."""
    from fastrlhf.config import ConfigError, RunError
    from fastrlhf.data.readers import DataError

    if isinstance(err, RunError):
        return 1
    if isinstance(err, (ConfigError, DataError, OSError)):
        return 2
    return None


def _one_line(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err)
    return " ".join(text.split())


def _run(args) -> int:
    if args.command == "demo":
        from fastrlhf.demo import run_demo_cli
        return int(run_demo_cli(args) or 0)
    if args.command == "plan":
        from fastrlhf.engine.planner import plan_cli
        return int(plan_cli(args))
    if args.command == "arena":
        from fastrlhf.arena import run_arena_cli
        return int(run_arena_cli(args) or 0)
    if args.command == "report":
        from fastrlhf.telemetry.report import report_cli
        return int(report_cli(args.run_dir) or 0)
    module, func, _ = _COMMANDS[args.command]
    return int(getattr(importlib.import_module(module), func)(args.config, args.overrides) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""PPO's evaluation on held-out prompts and the end of a run (``PPOTrainer.evaluate`` / ``finish`` call these
with the trainer): ``eval_*`` metrics and a table of sample generations; ``final/``,
``critic/`` (a ``ValueModel`` folder), ``ppo_result.json`` and ``plots/``."""

from __future__ import annotations

import json
import os

import torch

from fastrlhf.data import prompt_features
from fastrlhf.rollout.base import SamplingParams
from fastrlhf.trainers.ppo_batch import build_batch
from fastrlhf.trainers.ppo_checks import reduce_metrics
from fastrlhf.trainers.ppo_state import save_critic


def setup_eval(trainer, eval_prompts, eval_texts) -> None:
    """This rank's held-out prompts (an equal count on every rank: the sharded models run the same
    number of forwards) and their texts (for ``gold_fn`` and the sample table)."""
    trainer.eval_prompt_ids, trainer.eval_texts = [], []
    if not eval_prompts:
        return
    encoded = [list(p) if not isinstance(p, str) else prompt_features(p, trainer.tokenizer)["input_ids"]
               for p in eval_prompts]
    texts = list(eval_texts) if eval_texts is not None else [
        p if isinstance(p, str) else trainer.tokenizer.decode(p) for p in eval_prompts]
    rank, world = trainer.runtime.rank, trainer.runtime.world_size
    n = len(encoded) // world * world
    trainer.eval_prompt_ids, trainer.eval_texts = encoded[rank:n:world], texts[rank:n:world]


@torch.no_grad()
def evaluate(trainer, step: int) -> dict:
    """The current policy on the held-out prompts (the same sampling seed every time): RM score (as
    PPO sees it), KL to the reference (summed log-ratio per sequence), response length and gold
    reward when ``gold_fn`` is known, logged as ``eval_*``; the first ``eval_samples`` generations
    go to ``output_dir/eval_samples.jsonl`` (one row per sample and evaluation)."""
    from fastrlhf.trainers.ppo import derive_seed

    cfg, r = trainer.config, trainer.config.rollout
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, seed=derive_seed(cfg.seed, "eval", trainer.runtime.rank))
    scores, kls, lengths, texts, golds = [], [], [], [], []
    bsz = cfg.rollout_batch_size
    for k in range(0, len(trainer.eval_prompt_ids), bsz):
        prompts = trainer.eval_prompt_ids[k:k + bsz]
        trainer._refill_engine()
        with trainer.runtime.scheduler.phase("generate"):
            gen = trainer.rollout.generate(prompts, params)
        batch = build_batch(prompts, gen, pad_token_id=trainer.tokenizer.pad_token_id,
                            device=trainer.runtime.device)
        with trainer.runtime.scheduler.phase("score"):
            s, _ = trainer.score(batch)
        keep = batch.keep
        scores += s[keep].tolist()
        kls += (batch.old_logprobs - batch.ref_logprobs).sum(-1)[keep].tolist()
        lengths += batch.mask.sum(-1)[keep].float().tolist()
        for i, (row, m) in enumerate(zip(batch.responses.cpu(), batch.mask.cpu(), strict=True)):
            if keep[i]:
                text = trainer.tokenizer.decode(row[m], skip_special_tokens=True)
                texts.append((trainer.eval_texts[k + i], text))
                if trainer.gold_fn is not None:
                    golds.append(float(trainer.gold_fn(trainer.eval_texts[k + i], text)))
    trainer.runtime.scheduler.pop_stats()  # eval phases are not the next iteration's
    n = max(len(scores), 1)
    metrics = {"eval_rm_score": sum(scores) / n, "eval_kl": sum(kls) / n,
               "eval_response_length": sum(lengths) / n}
    if trainer.gold_fn is not None:
        metrics["eval_gold_reward"] = sum(golds) / max(len(golds), 1)
    row = trainer.logger.log(step, reduce_metrics(metrics, trainer.runtime.device), stage="ppo")
    if trainer.runtime.is_main and cfg.eval_samples:
        with (trainer.output_dir / "eval_samples.jsonl").open("a") as f:
            for j, (prompt, text) in enumerate(texts[:cfg.eval_samples]):
                sample = {"stage": "ppo", "step": step, "prompt": prompt, "response": text,
                          "rm_score": scores[j], "kl": kls[j], "length": lengths[j]}
                if golds:
                    sample["gold"] = golds[j]
                f.write(json.dumps(sample) + "\n")
    return row


def finish(trainer) -> dict:
    """After :meth:`train`: ``output_dir/final`` (the policy), ``output_dir/critic`` (a ``ValueModel``
    folder; separate critic only), ``ppo_result.json`` (the last iteration's metrics, the last
    evaluation's, the early-stop rule if one fired) and ``plots/`` (``fastrlhf report``'s curves).
    Collective under torchrun (every rank calls it); files come from rank 0. Returns the result."""
    from fastrlhf.telemetry.metrics import read_metrics
    from fastrlhf.telemetry.report import write_report

    trainer.save_final()
    if trainer.critic is not None:
        save_critic(trainer, trainer.output_dir / "critic")
    result: dict = {}
    if trainer.runtime.is_main:
        path = trainer.output_dir / "metrics.jsonl"
        rows = [r for r in read_metrics(path) if r.get("stage") == "ppo"] if path.is_file() else []
        train = [r for r in rows if "iteration" in r]
        evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
        for row in (train[-1:] + evals[-1:]):
            result.update({k: v for k, v in row.items() if isinstance(v, (int, float))
                           and not isinstance(v, bool) and k not in ("step", "time")
                           and not k.startswith(("plan/", "mem/", "time/", "tokens_per_s/"))})
        if trainer.stop_state.get("stopped"):
            result["early_stop"] = trainer.stop_state["stopped"]
        tmp = trainer.output_dir / "ppo_result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, trainer.output_dir / "ppo_result.json")
        if rows:
            write_report(trainer.output_dir)
    trainer.runtime.barrier()
    return result

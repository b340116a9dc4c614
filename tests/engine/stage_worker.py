"""Worker for tests/engine/test_stages_distributed.py: ``[torchrun --nproc_per_node 2] stage_worker.py
STAGE OUT_DIR [LORA_RANK [CRASH_AT]]``: trains the SFT or reward stage on fixed data and global batch, in one
process or FSDP2 over 2 gloo ranks (same script), fp32 on CPU; with ``LORA_RANK`` > 0 LoRA adapters are
trained, and with ``CRASH_AT`` every rank raises when that step starts (tests/engine/test_lora_fsdp.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import tiny_llama
from fastrlhf.trainers.reward import RewardConfig, RewardTrainer
from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

WORDS = "a big red cat saw the small dog and ran to one two three four five six".split()


def sft_rows(n: int) -> list[dict]:
    return [{"prompt": " ".join(WORDS[i % 7:i % 7 + 3]),
             "response": " ".join(WORDS[(i * 3) % 11:(i * 3) % 11 + 1 + i % 5])} for i in range(n)]


def rm_rows(n: int) -> list[dict]:
    return [{"prompt": WORDS[i % 9], "chosen": " ".join(WORDS[i % 5:i % 5 + 3]),
             "rejected": " ".join(WORDS[(i + 4) % 12:(i + 4) % 12 + 1 + i % 3])} for i in range(n)]


def main(stage: str, out: str, lora_rank: int = 0, crash_at: int = 0) -> None:
    """The model comes from a folder (``model=None``): under torchrun rank 0 reads it and the other rank
    receives its shards (``engine.loading``); one process loads it whole."""
    import torch.distributed as dist
    tok = build_test_tokenizer(padding_side="right")
    lm_dir = Path(out).parent / f"{Path(out).name}-lm"
    if int(os.environ.get("RANK", "0")) == 0:
        lm = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=0)
        lm.save_pretrained(lm_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        dist.barrier()
    common = dict(model=str(lm_dir), data="unused", output_dir=out, lr=3e-3, epochs=1, batch_size=4,
                  micro_batch_size=1, max_length=48, progress=False, tensorboard=False, warmup_ratio=0.0,
                  save_every=2, precision="fp32", device="cpu", lora_rank=lora_rank)
    if stage == "sft":
        trainer = SFTTrainer(SFTConfig(**common), tokenizer=tok, train_rows=sft_rows(11))
    else:
        trainer = RewardTrainer(RewardConfig(**common), tokenizer=tok, train_rows=rm_rows(9), eval_rows=rm_rows(4))
    from fastrlhf.engine.fsdp import is_fsdp
    print(f"fsdp={is_fsdp(trainer.model)} world={dist.get_world_size() if dist.is_initialized() else 0}")
    if crash_at:  # a crash in the middle of the run, after the checkpoint of step crash_at - 1
        step, calls = trainer.train_step, []

        def crashing_step(indices):
            calls.append(1)
            if len(calls) == crash_at:
                raise RuntimeError(f"simulated crash at step {crash_at}")
            return step(indices)
        trainer.train_step = crashing_step
    trainer.train()
    if dist.is_initialized():  # as the other workers: no process group left to die with the interpreter
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:5]))

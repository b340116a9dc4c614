"""DCP checkpoints in one process: exact restore of model, AdamW state, RNG and a JSON/tensor trainer state;
another world size is refused with a message; nothing is a pickle."""
from __future__ import annotations

import json

import pytest
import torch

from fastrlhf.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastrlhf.engine.precision import adamw
from fastrlhf.models import tiny_llama

VOCAB = 61


def _step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_save_then_restore_reproduces_the_next_steps(tmp_path):
    model = tiny_llama(VOCAB, seed=0)
    opt = adamw(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    _step(model, opt, ids)
    state = {"step": 1, "moments": {"mean": 0.25, "count": torch.tensor(3.0)}, "stop": None}
    save_checkpoint(tmp_path / "step-00000001", models={"m": model}, optimizers={"m": (model, opt)}, state=state)
    names = sorted(p.name for p in (tmp_path / "step-00000001").iterdir())
    assert names == [".metadata", "__0_0.distcp", "rng-rank0.json", "trainer_state.json"]
    after = [_step(model, opt, ids) for _ in range(2)] + [torch.rand(()).item()]
    got = load_checkpoint(latest_checkpoint(tmp_path), models={"m": model}, optimizers={"m": (model, opt)})
    again = [_step(model, opt, ids) for _ in range(2)] + [torch.rand(()).item()]
    assert after == again
    assert got["step"] == 1 and got["stop"] is None and got["moments"]["mean"] == 0.25
    assert torch.equal(got["moments"]["count"], torch.tensor(3.0))


def test_other_world_size_and_incomplete_checkpoints(tmp_path):
    model = tiny_llama(VOCAB, seed=0)
    opt = adamw(model.parameters(), lr=1e-2)
    ckpt = save_checkpoint(tmp_path / "step-00000002", models={"m": model}, optimizers={"m": (model, opt)},
                           state={"step": 2})
    (tmp_path / "step-00000003").mkdir()  # a crash before trainer_state.json: not a checkpoint
    assert latest_checkpoint(tmp_path) == ckpt
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(RuntimeError, match="written by 2 ranks and this run has 1; resume with --nproc_per_node 2"):
        load_checkpoint(ckpt, models={"m": model}, optimizers={"m": (model, opt)})

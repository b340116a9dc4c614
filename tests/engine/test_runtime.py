"""engine.runtime helpers that need no process group."""
import pytest
import torch

from fastrlhf.data import build_test_tokenizer
from fastrlhf.engine.runtime import eos_token_ids
from fastrlhf.models import PolicyWithLoss, tiny_llama


def test_eos_ids_merge_tokenizer_and_generation_config():
    tok = build_test_tokenizer()
    lm = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert eos_token_ids(lm, tok) == [tok.eos_token_id]
    lm.generation_config.eos_token_id = [tok.eos_token_id, 7, 9]  # chat models end turns with several ids
    assert eos_token_ids(PolicyWithLoss(lm), tok) == [tok.eos_token_id, 7, 9]
    lm.generation_config.eos_token_id = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        eos_token_ids(lm, tok)


def test_use_fsdp_decides_one_gpu_process_too(monkeypatch):
    """FSDP2 whenever there is a process group of several ranks or a GPU; plain modules only in one CPU
    process, unless forced (``FASTRLHF_FSDP``: the 1-rank path on CPU, or plain modules on one GPU)."""
    from fastrlhf.engine.distributed import FSDP_ENV, fsdp_override, use_fsdp
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert use_fsdp(gpu, 1) and use_fsdp(gpu, 8) and use_fsdp(cpu, 2)
    assert not use_fsdp(cpu, 1)
    assert use_fsdp(cpu, 1, force=True) and not use_fsdp(gpu, 1, force=False)
    assert use_fsdp(cpu, 2, force=False)  # several ranks always shard
    monkeypatch.delenv(FSDP_ENV, raising=False)
    assert fsdp_override() is None and fsdp_override(True) is True
    monkeypatch.setenv(FSDP_ENV, "1")
    assert fsdp_override() is True and fsdp_override(False) is False
    monkeypatch.setenv(FSDP_ENV, "0")
    assert fsdp_override() is False
    monkeypatch.setenv(FSDP_ENV, "yes")
    with pytest.raises(ValueError, match="FASTRLHF_FSDP must be 0, 1 or unset"):
        fsdp_override()

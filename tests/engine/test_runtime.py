"""engine.runtime helpers that need no process group."""
import pytest

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

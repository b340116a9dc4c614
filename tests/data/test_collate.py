"""pad_batch: left/right padding, -100 labels, prefixed keys, scalars, errors."""
import pytest
import torch

from fastrlhf.data import build_test_tokenizer, pad_batch, sft_features


def test_right_and_left_padding():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
             {"input_ids": torch.tensor([8]), "labels": [8], "attention_mask": [1]}]
    right = pad_batch(feats, pad_id=0, padding_side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in right.values())
    left = pad_batch(feats, pad_id=9, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_prefixed_keys_and_scalars():
    feats = [{"chosen_input_ids": [1, 2], "rejected_input_ids": [3], "chosen_attention_mask": [1, 1],
              "rejected_attention_mask": [1], "margin": 1},
             {"chosen_input_ids": [4], "rejected_input_ids": [5, 6, 7], "chosen_attention_mask": [1],
              "rejected_attention_mask": [1, 1, 1], "margin": 0.5}]
    b = pad_batch(feats, pad_id=0)
    assert b["rejected_input_ids"].tolist() == [[3, 0, 0], [5, 6, 7]]
    assert b["chosen_attention_mask"].tolist() == [[1, 1], [1, 0]]
    torch.testing.assert_close(b["margin"], torch.tensor([1.0, 0.5]))


def test_with_real_features_left_padding_for_generation():
    tok = build_test_tokenizer()
    feats = [sft_features("hello", "hi", tok), sft_features("what is 3 + 4 ?", "7", tok)]
    b = pad_batch(feats, tok.pad_token_id, tok.padding_side)
    assert b["input_ids"][:, -1].tolist() == [tok.eos_token_id] * 2
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_errors():
    with pytest.raises(ValueError, match="no features"):
        pad_batch([], 0)
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch([{"input_ids": [1]}], 0, "top")
    with pytest.raises(ValueError, match="keys"):
        pad_batch([{"input_ids": [1]}, {"labels": [1]}], 0)
    with pytest.raises(ValueError, match="'tokens'"):
        pad_batch([{"tokens": [1]}], 0)
    with pytest.raises(ValueError, match="'text'"):
        pad_batch([{"text": "a"}], 0)

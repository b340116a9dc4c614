"""One whole-layer bucketing rule (``weight_sync.bucket_layers``) shared by the weight sync and the HF export."""
from __future__ import annotations

import pytest

from fastrlhf.data import build_test_tokenizer
from fastrlhf.engine import weight_sync
from fastrlhf.engine.weight_sync import bucket_layers, group_by_layer, iter_weight_buckets, policy_parameters
from fastrlhf.models import tiny_llama


def test_bucket_layers_greedy_rule():
    sizes = [5, 3, 3, 10, 1, 1]
    assert list(bucket_layers(((i, n) for i, n in enumerate(sizes)), 8)) == [[0, 1], [2], [3], [4, 5]]
    assert list(bucket_layers([("a", 100)], 1)) == [["a"]]  # a layer larger than a bucket: alone
    assert list(bucket_layers([], 8)) == []
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        list(bucket_layers([("a", 1)], 0))
    assert not hasattr(weight_sync, "bucket_plan")  # one rule, not two


@pytest.mark.parametrize("bucket_bytes", [1, 40 * 1024, 10**9])
def test_weight_buckets_follow_bucket_layers(bucket_bytes):
    tok = build_test_tokenizer()
    lm = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=0)
    params = dict(lm.named_parameters())
    layers = group_by_layer(policy_parameters(lm))
    sizes = [sum(params[n].numel() * params[n].element_size() for n, _ in g) for g in layers]
    expected = [[hf for g in b for _, hf in g]
                for b in bucket_layers(zip(layers, sizes, strict=True), bucket_bytes)]
    got = [[name for name, _ in b] for b in iter_weight_buckets(lm, bucket_bytes)]
    assert got == expected
    if bucket_bytes == 1:
        assert len(got) == len(layers)
    if bucket_bytes == 10**9:
        assert len(got) == 1

"""The local word-level tokenizer: ids, specials, padding side, chat template, save/reload."""
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fastrlhf.data import build_test_tokenizer, build_word_tokenizer


def test_test_tokenizer_is_fixed_and_small():
    a, b = build_test_tokenizer(), build_test_tokenizer()
    assert isinstance(a, PreTrainedTokenizerFast)
    assert a.get_vocab() == b.get_vocab()
    assert 100 <= len(a) <= 130
    assert (a.pad_token_id, a.eos_token_id, a.bos_token_id, a.unk_token_id) == (0, 1, 2, 3)
    assert a.padding_side == "left"


def test_whitespace_words_unknowns_and_no_added_specials():
    tok = build_word_tokenizer(["the", "cat", "sat"])
    ids = tok("the  cat\nsat on", add_special_tokens=True)["input_ids"]  # no BOS/EOS added on encode
    assert tok.convert_ids_to_tokens(ids) == ["the", "cat", "sat", "<unk>"]
    assert tok.decode(ids) == "the cat sat <unk>"
    # role markers are single tokens even when glued to a word, and special for decoding
    ids = tok("cat<|end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["cat", "<|end|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "cat"


def test_duplicates_and_bad_words():
    tok = build_word_tokenizer(["a", "b", "a"], chat_template=None)
    assert len(tok) == 4 + 2 and tok.chat_template is None
    with pytest.raises(ValueError, match="whitespace"):
        build_word_tokenizer(["two words"])
    with pytest.raises(ValueError, match="padding_side"):
        build_word_tokenizer(["a"], padding_side="middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_save_reload_round_trip(tmp_path, side):
    tok = build_test_tokenizer(padding_side=side)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.padding_side == side
    assert back.get_vocab() == tok.get_vocab()
    specials = (back.pad_token, back.eos_token, back.bos_token, back.unk_token)
    assert specials == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert back.chat_template == tok.chat_template
    text = "hello cat zebra <|user|> 3 + 4 = 7"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    batch = back(["a cat", "the big red dog"], padding=True)["attention_mask"]
    assert batch[0] == ([0, 0, 1, 1] if side == "left" else [1, 1, 0, 0])


def test_chat_template_renders_and_masks_assistant():
    tok = build_test_tokenizer()
    msgs = [{"role": "user", "content": "hi cat"}, {"role": "assistant", "content": " hello dog "}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|user|> hi cat <|end|> <|assistant|> hello dog <|end|> "
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|> hi cat <|end|> <|assistant|> "
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["assistant_masks"] == [0, 0, 0, 0, 0, 1, 1, 1]

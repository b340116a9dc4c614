"""sft_features / chat_sft_features: prompt masking, truncation, rejection, assistant-only labels."""
import pytest
from tokenizers import processors

from fastrlhf.data import (
    IGNORE_INDEX,
    build_test_tokenizer,
    build_word_tokenizer,
    chat_sft_features,
    preference_features,
    prompt_features,
    sft_features,
)
from fastrlhf.data.tokenizer import DEFAULT_CHAT_TEMPLATE, TEST_WORDS

NO_TAGS = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def with_bos_eos_postprocessor(tok):
    """A tokenizer that, like many hub tokenizers, adds special tokens on encode (here BOS ... EOS)."""
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", tok.bos_token_id), ("<eos>", tok.eos_token_id)])
    return tok


def test_prompt_masked_eos_appended():
    tok = build_test_tokenizer()
    f = sft_features("what is 3 + 4 ?", "7 .", tok)
    p, r = ids(tok, "what is 3 + 4 ?"), ids(tok, "7 .")
    assert f["input_ids"] == p + r + [tok.eos_token_id]
    assert f["labels"] == [IGNORE_INDEX] * len(p) + r + [tok.eos_token_id]
    assert f["attention_mask"] == [1] * (len(p) + len(r) + 1)


def test_leading_bos_kept_trailing_eos_not_doubled():
    tok = with_bos_eos_postprocessor(build_test_tokenizer())
    f = sft_features("hello cat", "hi dog", tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert f["input_ids"] == [bos] + ids(tok, "hello cat") + ids(tok, "hi dog") + [eos]
    assert f["labels"][:3] == [IGNORE_INDEX] * 3 and f["labels"][3:] == ids(tok, "hi dog") + [eos]
    empty = sft_features("", "hi", tok)  # an empty prompt still gets the BOS the tokenizer adds
    assert empty["input_ids"] == [bos] + ids(tok, "hi") + [eos] and empty["labels"][0] == IGNORE_INDEX


def test_truncation_cuts_response_end_and_keeps_eos():
    """API.md: the function itself cuts the response end and keeps EOS (the trainers never call it so)."""
    tok = build_test_tokenizer()
    f = sft_features("hello cat", "the big red dog is good", tok, max_length=5)
    assert f["input_ids"] == ids(tok, "hello cat the big") + [tok.eos_token_id]
    assert f["labels"] == [IGNORE_INDEX] * 2 + ids(tok, "the big") + [tok.eos_token_id]
    exact = sft_features("hello cat", "the big", tok, max_length=5)
    assert exact == f  # fits exactly: nothing cut
    assert len(sft_features("hello", "a b c", tok, max_length=100)["input_ids"]) == 5


def test_rejects_when_no_response_token_fits():
    tok = build_test_tokenizer()
    with pytest.raises(ValueError, match=r"prompt has 3 tokens.*max_length >= 5, got max_length=4"):
        sft_features("hello big cat", "hi", tok, max_length=4)
    with pytest.raises(ValueError, match="no tokens"):
        sft_features("hello", "   ", tok)
    no_eos = build_test_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        sft_features("hello", "hi", no_eos)


CONVERSATION = [
    {"role": "system", "content": "be good"},
    {"role": "user", "content": "what is 3 + 4 ?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "and 2 + 2 ?"},
    {"role": "assistant", "content": "4 ."},
]


def expected_chat(tok):
    """Hand-built token layout of CONVERSATION under DEFAULT_CHAT_TEMPLATE."""
    pieces = [("<|system|> be good <|end|>", False), ("<|user|> what is 3 + 4 ? <|end|>", False),
              ("<|assistant|>", False), ("7 <|end|>", True),
              ("<|user|> and 2 + 2 ? <|end|>", False), ("<|assistant|>", False), ("4 . <|end|>", True)]
    input_ids, labels = [], []
    for text, trained in pieces:
        t = ids(tok, text)
        input_ids += t
        labels += t if trained else [IGNORE_INDEX] * len(t)
    return input_ids, labels


@pytest.mark.parametrize("template", ["generation-tags", "prefix-diffing"])
def test_chat_labels_only_on_assistant_turns(template):
    tok = build_test_tokenizer() if template == "generation-tags" else build_word_tokenizer(TEST_WORDS,
                                                                                             chat_template=NO_TAGS)
    f = chat_sft_features(CONVERSATION, tok)
    input_ids, labels = expected_chat(tok)
    assert f["input_ids"] == input_ids
    assert f["labels"] == labels
    assert f["attention_mask"] == [1] * len(input_ids)


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, NO_TAGS])
def test_chat_template_bos_not_doubled(template):
    tok = build_word_tokenizer(TEST_WORDS, chat_template="{{ bos_token }} " + template)
    tok = with_bos_eos_postprocessor(tok)
    f = chat_sft_features(CONVERSATION[1:3], tok)
    assert f["input_ids"][0] == tok.bos_token_id and f["input_ids"].count(tok.bos_token_id) == 1
    assert f["input_ids"][-1] != tok.eos_token_id
    trained = [t for t, y in zip(f["input_ids"], f["labels"], strict=True) if y != IGNORE_INDEX]
    assert trained == ids(tok, "7 <|end|>")


def test_chat_truncation_keeps_whole_assistant_turns():
    tok = build_test_tokenizer()
    input_ids, labels = expected_chat(tok)
    first_end = labels.index(ids(tok, "<|end|>")[0], labels.index(ids(tok, "7")[0])) + 1
    for max_length in (first_end, len(input_ids) - 1):  # second turn cut: dropped whole, with its prompt
        f = chat_sft_features(CONVERSATION, tok, max_length=max_length)
        assert f["input_ids"] == input_ids[:first_end] and f["labels"] == labels[:first_end]
    assert chat_sft_features(CONVERSATION, tok, max_length=len(input_ids))["labels"] == labels
    with pytest.raises(ValueError, match="no assistant turn fits"):
        chat_sft_features(CONVERSATION, tok, max_length=first_end - 1)


def test_sft_rows_are_never_cut_by_the_trainer():
    """The trainer's row features refuse (never cut) an over-long row, prompt/response and messages alike."""
    from fastrlhf.trainers.sft import sft_row_features
    tok = build_test_tokenizer()
    with pytest.raises(ValueError, match="7 tokens, more than max_length=5"):
        sft_row_features({"prompt": "hello cat", "response": "the big red dog"}, tok, 5)
    fits = sft_row_features({"prompt": "hello cat", "response": "the big"}, tok, 5)
    assert fits["input_ids"] == ids(tok, "hello cat the big") + [tok.eos_token_id]
    input_ids, labels = expected_chat(tok)
    with pytest.raises(ValueError, match=f"{len(input_ids)} tokens, more than max_length"):
        sft_row_features({"messages": CONVERSATION}, tok, len(input_ids) - 1)
    assert sft_row_features({"messages": CONVERSATION}, tok, len(input_ids))["labels"] == labels


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty content"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], r"messages\[0\]"),
    ("hello", "non-empty list"),
])
def test_chat_rejects_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        chat_sft_features(messages, build_test_tokenizer())


def test_chat_needs_a_template_and_a_prefix_stable_one():
    with pytest.raises(ValueError, match="chat_template"):
        chat_sft_features(CONVERSATION, build_word_tokenizer(TEST_WORDS, chat_template=None))
    # a template that renders only the last user turn is not prefix-stable
    odd = ("{%- for m in messages -%}{%- if m['role'] != 'user' or loop.index0 >= messages|length - 2 -%}"
           "{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{%- endif -%}{%- endfor -%}"
           "{%- if add_generation_prompt -%}{{ '<|assistant|> ' }}{%- endif -%}")
    with pytest.raises(ValueError, match=r"not render messages\[:3\] as a prefix.*generation"):
        chat_sft_features(CONVERSATION, build_word_tokenizer(TEST_WORDS, chat_template=odd))


def test_prompt_features_and_preference_features():
    tok = with_bos_eos_postprocessor(build_test_tokenizer())
    bos, eos = tok.bos_token_id, tok.eos_token_id
    expected = {"input_ids": [bos] + ids(tok, "hello cat"), "attention_mask": [1] * 3}
    assert prompt_features("hello cat", tok) == expected
    with pytest.raises(ValueError, match="3 tokens, more than max_length=2"):
        prompt_features("hello cat", tok, max_length=2)
    with pytest.raises(ValueError, match="more than max_length=5"):  # never cut
        preference_features("hello", "big red dog", "no", tok, max_length=5)
    f = preference_features("hello", "big red", "no", tok, max_length=5, margin=2)
    assert f["chosen_input_ids"] == [bos] + ids(tok, "hello big red") + [eos]
    assert f["rejected_input_ids"] == [bos] + ids(tok, "hello no") + [eos]
    assert f["chosen_attention_mask"] == [1] * 5 and f["rejected_attention_mask"] == [1] * 4
    assert f["margin"] == 2.0
    assert "margin" not in preference_features("hello", "a", "b", tok)

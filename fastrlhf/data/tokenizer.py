"""Local word-level tokenizers: built in-process with the ``tokenizers`` library, nothing downloaded.

The built-in demo task and every test use these. A word-level vocabulary (whitespace split, one id
per word) keeps the tiny demo model's vocabulary small and makes token counts easy to reason about.
The result is an ordinary ``transformers.PreTrainedTokenizerFast``: it pads, batches, applies its chat
template and round-trips through ``save_pretrained`` / ``from_pretrained`` like a hub tokenizer.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

DEFAULT_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")

#: Role markers of :data:`DEFAULT_CHAT_TEMPLATE`; each is one special token.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Renders "<|user|> hi there <|end|> <|assistant|> hello <|end|> " (tokens separated by single spaces so
# the whitespace pre-tokenizer sees them). The assistant's content and its "<|end|>" sit inside
# {% generation %} so `apply_chat_template(..., return_assistant_tokens_mask=True)` can mark them; the
# role marker itself is prompt (the model is not trained to emit the marker it was given).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|> ' }}{% generation %}{{ message['content'] | trim }}{{ ' <|end|>' }}{% endgeneration %}"
    "{{ ' ' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|> ' + (message['content'] | trim) + ' <|end|> ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|> ' }}{%- endif -%}"
)

#: The ~100 words of :func:`build_test_tokenizer` (digits, colours, animals, verbs, a few fillers).
TEST_WORDS = (
    "0 1 2 3 4 5 6 7 8 9 10 "
    "red green blue yellow black white orange purple pink brown "
    "cat dog bird fish horse cow sheep mouse lion tiger "
    "a an the is are was be to of and or not in on at with for from by "
    "i you he she it we they me my your "
    "yes no hello hi thanks please sorry good bad big small "
    "what why how who where when which "
    "run jump eat sleep see say like want know think "
    "count add sum answer question repeat reverse sort list word "
    ". , ? ! : + = -"
).split()


def build_word_tokenizer(
    words: Iterable[str],
    *,
    special: Sequence[str] = DEFAULT_SPECIAL,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words``.

    Ids: ``special`` first (in order: pad, eos, bos, unk), then the role markers of the chat template
    (when ``chat_template`` is given), then ``words`` in first-seen order (duplicates dropped). Text is
    split on whitespace only; a word not in the vocabulary maps to unk. No BOS/EOS is added on encode
    (``add_special_tokens`` is a no-op), so callers append EOS themselves, as ``sft_features`` does.
    ``padding_side`` goes to the constructor so ``save_pretrained`` keeps it.
    """
    if len(special) != 4:
        raise ValueError(f"special must be (pad, eos, bos, unk), got {tuple(special)!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    pad, eos, bos, unk = special
    markers = ROLE_TOKENS if chat_template is not None else ()
    vocab: dict[str, int] = {}
    for token in (*special, *markers, *words):
        if not token or any(ch.isspace() for ch in token):
            raise ValueError(f"vocabulary entries must be non-empty and contain no whitespace: {token!r}")
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the tokenizers library joins word-level tokens with single spaces on decode.
    # Special tokens are matched before the pre-tokenizer: "<|end|>" is one token even glued to a word.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*special, *markers)])

    kwargs = dict(
        tokenizer_object=backend,
        pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk,
        padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],
    )
    if markers:
        kwargs["additional_special_tokens"] = list(markers)
    tok = PreTrainedTokenizerFast(**kwargs)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_test_tokenizer(*, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """The fixed ~100-word tokenizer the tests use (same ids on every machine and every call)."""
    return build_word_tokenizer(list(TEST_WORDS), padding_side=padding_side)

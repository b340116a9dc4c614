"""Token features for supervised fine-tuning: prompt/response pairs and chat conversations.

Labels follow the Hugging Face causal-LM convention: ``labels`` has the length of ``input_ids`` (the
model shifts by one internally) and ``IGNORE_INDEX`` (-100) wherever no loss is taken.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

IGNORE_INDEX = -100

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _encode(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's leading special tokens (e.g. Llama's BOS) but never a trailing EOS.
    A prompt rendered by a chat template that already starts with BOS gets no second one."""
    bare = _encode(tokenizer, prompt, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prompt.startswith(bos):
        return bare
    full = _encode(tokenizer, prompt, add_special_tokens=True)
    if not bare:  # an empty prompt: keep only what the tokenizer puts in front (BOS)
        return [t for t in full if t != tokenizer.eos_token_id]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start] + bare
    return bare


def sft_features(prompt: str, response: str, tokenizer, *, max_length: int | None = None) -> dict:
    """``input_ids = prompt_ids + response_ids + [eos]``, labels -100 on the prompt, attention all ones.

    Prompt and response are tokenized separately (the prompt with the tokenizer's leading special
    tokens such as BOS, the response without any) and joined as they are: put any separator the model
    expects (a space, a newline) into the text. When the result exceeds ``max_length``, the response
    end is cut and EOS is kept after the last response token that fits: the example still teaches
    stopping, and it is never silently left without its EOS label. The prompt is never cut: if the
    prompt plus EOS leaves no room for a response token, ``ValueError`` says so. (This is the API
    function; the trainers never cut: they tokenize whole and drop over-long rows with a count, or stop at
    the first one with ``drop_overlong: false``; see ``fastrlhf.trainers.sft.sft_row_features``.)
    Returns lists of ints: ``{"input_ids", "labels", "attention_mask"}``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; sft_features appends EOS to every response")
    prompt_ids = _prompt_ids(tokenizer, prompt)
    response_ids = _encode(tokenizer, response, add_special_tokens=False)
    if not response_ids:
        raise ValueError(f"response {response!r} has no tokens")
    if max_length is not None:
        room = max_length - len(prompt_ids) - 1
        if room < 1:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens: with EOS and at least one response token "
                             f"it needs max_length >= {len(prompt_ids) + 2}, got max_length={max_length}")
        response_ids = response_ids[:room]
    input_ids = prompt_ids + response_ids + [eos]
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def prompt_features(prompt: str, tokenizer, *, max_length: int | None = None) -> dict:
    """Generation input for PPO: the prompt's ids (with the tokenizer's leading specials, as in
    :func:`sft_features`, so the policy sees the same context it was fine-tuned on).

    A prompt longer than ``max_length`` raises ``ValueError`` (cutting it would change the task
    silently); filter such rows up front. Returns ``{"input_ids", "attention_mask"}`` lists.
    """
    ids = _prompt_ids(tokenizer, prompt)
    if not ids:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"prompt has {len(ids)} tokens, more than max_length={max_length}")
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def preference_features(prompt: str, chosen: str, rejected: str, tokenizer, *, max_length: int | None = None,
                        margin: float | None = None) -> dict:
    """Reward-model pair: ``prompt + chosen + [eos]`` and ``prompt + rejected + [eos]``, each built
    exactly as :func:`sft_features`. Never cut: a side longer than ``max_length`` is a ``ValueError``
    naming ``max_length`` (a pair whose answers differ only after a cut would become two identical
    sequences labelled as a preference); the reward trainer drops such pairs with a count or stops.

    Returns ``chosen_input_ids``, ``chosen_attention_mask``, ``rejected_input_ids``,
    ``rejected_attention_mask`` (lists) and ``margin`` when given; ``pad_batch`` collates them.
    """
    out = {}
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        f = sft_features(prompt, response, tokenizer)
        if max_length is not None and len(f["input_ids"]) > max_length:
            raise ValueError(f"prompt + {name} + EOS is {len(f['input_ids'])} tokens, "
                             f"more than max_length={max_length}")
        out[f"{name}_input_ids"] = f["input_ids"]
        out[f"{name}_attention_mask"] = f["attention_mask"]
    if margin is not None:
        out["margin"] = float(margin)
    return out


def check_messages(messages) -> None:
    """Raise ``ValueError`` unless ``messages`` is a list of ``{"role": str, "content": str}`` with an
    assistant turn whose content is not empty."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"messages[{i}] is an assistant turn with empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages has no assistant turn: nothing to train on")


def _render_ids(tokenizer, messages, *, add_generation_prompt: bool = False) -> list[int]:
    # The template writes its own special tokens; the tokenizer must not add BOS a second time.
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return _encode(tokenizer, text, add_special_tokens=False)


def _spans_from_generation_tags(tokenizer, messages) -> tuple[list[int], list[tuple[int, int]]]:
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return ids, spans


def _spans_from_prefixes(tokenizer, messages) -> tuple[list[int], list[tuple[int, int]]]:
    """Assistant spans by rendering growing prefixes of the conversation and diffing their token counts.

    Turn i spans ``[len(render(msgs[:i], generation prompt)), len(render(msgs[:i+1])))``: its content
    plus whatever the template closes the turn with (end-of-turn token). Needs a template whose render
    of a prefix is a token prefix of the whole; otherwise raises ``ValueError``.
    """
    ids = _render_ids(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = _render_ids(tokenizer, messages[:i + 1])
        if ids[:len(head)] != head or ids[:len(upto)] != upto or len(head) >= len(upto):
            raise ValueError(f"the chat template does not render messages[:{i + 1}] as a prefix of the "
                             "whole conversation; add {% generation %} markers to it so assistant tokens "
                             "can be found")
        spans.append((len(head), len(upto)))
    return ids, spans


def chat_sft_features(messages, tokenizer, *, max_length: int | None = None) -> dict:
    """Features of a conversation rendered by the tokenizer's chat template, with labels only on
    assistant turns (their content and end-of-turn token; role markers are prompt).

    Assistant tokens come from the template's ``{% generation %}`` markers when it has them
    (``return_assistant_tokens_mask``), else from rendering prefixes of the conversation.
    With ``max_length``, the conversation is cut after the last assistant turn that fits whole (an
    assistant turn is never kept without its end-of-turn token); ``ValueError`` if none fits. (The
    trainers never cut: see ``sft_features``.)
    Returns lists of ints: ``{"input_ids", "labels", "attention_mask"}``.
    """
    check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; use sft_features for prompt/response rows")
    if _GENERATION_TAG.search(tokenizer.chat_template):
        ids, spans = _spans_from_generation_tags(tokenizer, messages)
    else:
        ids, spans = _spans_from_prefixes(tokenizer, messages)
    if max_length is not None:
        spans = [(a, b) for a, b in spans if b <= max_length]
        if not spans:
            raise ValueError(f"no assistant turn fits in max_length={max_length} "
                             f"(the conversation has {len(ids)} tokens)")
        ids = ids[:spans[-1][1]]
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        labels[a:b] = ids[a:b]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}

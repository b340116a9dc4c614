"""The second built-in task: short arithmetic with a verifiable reward (no reward model).

A question is ``"what is 7 + 5 ?"`` (``a + b`` or ``a - b`` with ``a, b`` in 0..9 and ``a >= b`` for ``-``).
A worked answer restates the sum and gives the result: ``"7 + 5 = 12"``. The reward is exact-answer
correctness: 1 when the number after the last ``=`` equals the true result, else 0
(:func:`exact_answer_reward`, a ``rewards:`` function that reads the prompt row's ``answer`` field).

Demonstrations are imperfect, as worked answers scraped from students would be, and their mistakes are
systematic: on the *hard* questions (:func:`is_hard`: additions with a carry, ``a + b >= 10``, and subtractions
of 5 or more) the worked answer carries the student's habit (:func:`habit`: the carry is forgotten, ``7 + 5 = 2``;
a subtraction of 5 or more comes out one too big, ``9 - 6 = 4``) with probability ``1 - P_CORRECT_HARD`` and is
right otherwise; on the other questions it is right with probability ``P_CORRECT_EASY``, else off by one or two
at random. An SFT policy trained on them answers the easy questions right and, greedily, the hard ones with the
habit (greedy accuracy about 0.6), yet samples the right hard answer now and then: the exact-answer reward can
then teach it to drop the habit, on questions it was never trained on too. A fixed fifth of the (a, op, b)
questions is held out of SFT and RL training (:func:`split_of`), so ``accuracy`` on them measures
generalization, not recall.
Everything is a pure function of a seed.
"""
from __future__ import annotations

import hashlib
import random

OPS = ("+", "-")
DIGITS = range(10)
P_CORRECT_EASY = 0.9
P_CORRECT_HARD = 0.3
MAX_RESULT = 18
HELDOUT_SHARE = 0.2
TEMPLATE = "what is {} {} {} ?"


def vocabulary() -> list[str]:
    """Every word of the task (the word tokenizer's ids follow this order)."""
    return ["what", "is", "?", "=", *OPS, *(str(i) for i in range(MAX_RESULT + 1))]


def build_tokenizer():
    """Word-level tokenizer over :func:`vocabulary`, left padding (prompts are left-padded for generation)."""
    from fastrlhf.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(vocabulary(), chat_template=None, padding_side="left")


def all_questions() -> list[tuple[int, str, int]]:
    return [(a, op, b) for op in OPS for a in DIGITS for b in DIGITS if op == "+" or a >= b]


def result(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def split_of(a: int, op: str, b: int) -> str:
    """``"heldout"`` for a fixed ~20% of questions (by a hash, independent of any seed), else ``"train"``."""
    h = int.from_bytes(hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=4).digest(), "little")
    return "heldout" if h % 1000 < HELDOUT_SHARE * 1000 else "train"


def parse_question(prompt: str) -> tuple[int, str, int]:
    """``"what is A op B ?"`` -> ``(A, op, B)``; ValueError naming the prompt otherwise."""
    words = prompt.split()
    if (len(words) != 6 or words[:2] != ["what", "is"] or words[3] not in OPS or words[5] != "?"
            or not (words[2].isdigit() and words[4].isdigit())):
        raise ValueError(f"arithmetic prompt {prompt!r} is not of the form 'what is A + B ?'")
    return int(words[2]), words[3], int(words[4])


def make_prompt_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` rows ``{"prompt", "answer"}`` drawn uniformly from the questions of ``split``."""
    pool = [q for q in all_questions() if split_of(*q) == split]
    rng = random.Random(f"arith-prompts-{split}-{seed}")
    rows = []
    for _ in range(n):
        a, op, b = rng.choice(pool)
        rows.append({"prompt": TEMPLATE.format(a, op, b), "answer": str(result(a, op, b))})
    return rows


def is_hard(a: int, op: str, b: int) -> bool:
    """The questions the demonstrations get systematically wrong: a carry (``a + b >= 10``) or ``a - b`` with
    ``b >= 5``."""
    return a + b >= 10 if op == "+" else b >= 5


def habit(a: int, op: str, b: int) -> int:
    """The demonstrators' wrong answer to a hard question: the forgotten carry (``a + b - 10``), or a
    subtraction of 5 or more one too big (``a - b + 1``)."""
    if not is_hard(a, op, b):
        raise ValueError(f"{a} {op} {b} is not a hard question")
    return a + b - 10 if op == "+" else a - b + 1


def _worked_answer(a: int, op: str, b: int, rng: random.Random) -> str:
    right = result(a, op, b)
    c = right
    if is_hard(a, op, b):
        if rng.random() >= P_CORRECT_HARD:
            c = habit(a, op, b)
    elif rng.random() >= P_CORRECT_EASY:
        c = rng.choice([right + d for d in (-2, -1, 1, 2) if 0 <= right + d <= MAX_RESULT])
    return f"{a} {op} {b} = {c}"


def make_demonstrations(n: int, seed: int) -> list[dict]:
    """``n`` SFT rows ``{"prompt", "response", "answer"}`` on training questions (see the module docstring for
how often they are right)."""
    rng = random.Random(f"arith-demos-{seed}")
    rows = []
    for row in make_prompt_rows(n, seed + 1, "train"):
        a, op, b = parse_question(row["prompt"])
        rows.append({**row, "response": _worked_answer(a, op, b, rng)})
    return rows


def final_number(response: str) -> int | None:
    """The integer after the last ``=`` of ``response`` (None when there is none)."""
    words = response.split()
    if "=" not in words:
        return None
    after = words[len(words) - 1 - words[::-1].index("="):][1:]
    return int(after[0]) if after and after[0].isdigit() else None


def is_correct(prompt: str, response: str) -> bool:
    return final_number(response) == result(*parse_question(prompt))


def exact_answer_reward(prompts: list[str], responses: list[str], answer: list | None = None, **row) -> list[float]:
    """1.0 for a response whose final number (after the last ``=``) equals the row's ``answer`` (or, without
    that field, the question's true result), else 0.0. A ``rewards:`` function:
    ``{function: "fastrlhf.data.arithmetic_task:exact_answer_reward", weight: 1}``."""
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        want = int(answer[i]) if answer is not None and answer[i] is not None else result(*parse_question(p))
        out.append(1.0 if final_number(r) == want else 0.0)
    return out


def accuracy(prompts: list[str], responses: list[str]) -> float:
    return sum(is_correct(p, r) for p, r in zip(prompts, responses, strict=True)) / max(len(prompts), 1)


def exact_answer_gold(prompt: str, response: str) -> float:
    """``gold_fn`` form of the reward (logged as ``gold_reward``): 1.0 for an exactly right answer."""
    return float(is_correct(prompt, response))

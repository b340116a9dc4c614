"""The built-in demo task: "say on-topic things", with a hidden gold scorer the reward model never sees.

A prompt names a topic ("tell me about animals"). Each topic has five *good* words. The gold score
of a response (a sequence of words, EOS and other special tokens not counted) is

    gold = (# words that are good words of the prompt's topic)
           - (# words that are good words of *another* topic)
           - (# words beyond MAX_WORDS)

so the best the task allows is ``GOLD_MAX = MAX_WORDS = 8`` (eight on-topic words, nothing else).
Demonstrations are deliberately mediocre (0-4 good words, careless repeats, off-topic words, fillers),
so an SFT policy trained on them starts far below the maximum (about 1.5 of 8). Preference labels come
from a noisy Bradley-Terry draw on the gold scores,
``P(a preferred to b) = sigmoid((gold_a - gold_b) / tau)``,
as a human labeller would give; equal gold scores are a "tie" that labellers skip. Everything is a pure
function of a seed.

Why counts rather than *distinct* good words: a 2-layer reward model trained on a few thousand noisy
pairs learns per-word topic membership well but not duplicate detection, so a distinctness rule
turns PPO into a repeat-the-same-word reward hack (measured: gold fell while the RM score rose).
Overlong answers are still penalised, and off-topic words still cost, so the RM has to be read right.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

TOPICS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "lion", "bird"),
    "colors": ("red", "blue", "green", "yellow", "purple"),
    "food": ("bread", "apple", "rice", "cheese", "soup"),
    "weather": ("rain", "snow", "wind", "sun", "storm"),
    "music": ("song", "drum", "piano", "guitar", "violin"),
    "sports": ("ball", "goal", "race", "swim", "team"),
}
FILLERS = tuple(
    "the a and is very so i like it this that really some many nice big small we see love".split()
)
TEMPLATES = ("tell me about {}", "write about {}", "talk about {}", "say something about {}")
MAX_WORDS = 8
GOLD_MAX = float(MAX_WORDS)


def vocabulary() -> list[str]:
    """All words of the task, in a fixed order (the word tokenizer's ids follow it)."""
    words: list[str] = []
    for template in TEMPLATES:
        words += template.format("").split()
    words += list(TOPICS)
    for good in TOPICS.values():
        words += list(good)
    words += list(FILLERS)
    return list(dict.fromkeys(words))


def build_tokenizer():
    """Word-level tokenizer over :func:`vocabulary`, left padding (prompts are left-padded for generation)."""
    from fastrlhf.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(vocabulary(), chat_template=None, padding_side="left")


def topic_of(prompt: str) -> str:
    """The topic a prompt names (its last word). ValueError for a prompt that names none."""
    words = prompt.split()
    if not words or words[-1] not in TOPICS:
        raise ValueError(f"demo prompt {prompt!r} does not end with a topic ({sorted(TOPICS)})")
    return words[-1]


def gold_reward(prompt: str, response: str) -> float:
    """The hidden gold score of ``response`` (plain text, EOS / special tokens stripped) for ``prompt``."""
    topic = topic_of(prompt)
    good = set(TOPICS[topic])
    others = {w for t, ws in TOPICS.items() if t != topic for w in ws}
    words = response.split()
    on_topic = sum(w in good for w in words)
    off_topic = sum(w in others for w in words)
    overlong = max(0, len(words) - MAX_WORDS)
    return float(on_topic - off_topic - overlong)


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts, topics and templates drawn uniformly."""
    rng = random.Random(f"prompts-{seed}")
    return [rng.choice(TEMPLATES).format(rng.choice(list(TOPICS))) for _ in range(n)]


def _demonstration(prompt: str, rng: random.Random) -> str:
    topic = topic_of(prompt)
    others = [w for t, ws in TOPICS.items() if t != topic for w in ws]
    n_good = rng.choices((0, 1, 2, 3, 4), weights=(0.25, 0.3, 0.2, 0.15, 0.1))[0]
    words = rng.sample(TOPICS[topic], n_good)
    if words and rng.random() < 0.5:  # a careless repeat
        words.append(rng.choice(words))
    words += rng.sample(others, rng.choices((0, 1, 2), weights=(0.4, 0.4, 0.2))[0])
    words += rng.choices(FILLERS, k=rng.randint(1, 4))
    rng.shuffle(words)
    return " ".join(words[:MAX_WORDS])


def make_demonstrations(n: int, seed: int) -> list[dict]:
    """``n`` SFT rows ``{"prompt", "response"}`` of mediocre quality (see module docstring)."""
    rng = random.Random(f"demos-{seed}")
    return [{"prompt": p, "response": _demonstration(p, rng)} for p in make_prompts(n, seed + 1)]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    gold_chosen: float
    gold_rejected: float


def label_pairs(
    prompts: list[str], responses_a: list[str], responses_b: list[str], *, tau: float, seed: int
) -> list[PreferencePair]:
    """Noisy Bradley-Terry labels on gold scores; ties (equal gold) are skipped as a labeller would."""
    rng = random.Random(f"labels-{seed}")
    pairs = []
    for p, a, b in zip(prompts, responses_a, responses_b, strict=True):
        ga, gb = gold_reward(p, a), gold_reward(p, b)
        if ga == gb:
            continue
        prefer_a = rng.random() < 1.0 / (1.0 + math.exp(-(ga - gb) / tau))
        pairs.append(PreferencePair(p, a, b, ga, gb) if prefer_a else PreferencePair(p, b, a, gb, ga))
    return pairs

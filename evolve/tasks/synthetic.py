"""Deterministic synthetic long-context tasks: passkey, multi-key kv-retrieval, needle with distractors.

One generator serves three users: evolution (fitness), the quality benchmark
(held-out seeds) and the training data of our own small model — so the prompt
format a model is trained on is exactly the one it is evaluated on.

A sample is fully determined by ``(kind, seed, target_tokens)``. Lengths are hit
in *tokens* of the caller's tokenizer (any tokenizer with ``encode``), so the same
task scales to real models.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict

TaskKind = Literal["passkey", "kv_retrieval", "needle"]
TASK_KINDS: tuple[str, ...] = ("passkey", "kv_retrieval", "needle")

# A small closed vocabulary for filler: "grass is green"-style noise, as in the
# passkey literature, but varied so that a model cannot memorise one sentence.
_SUBJECTS = (
    "The grass",
    "The sky",
    "The river",
    "A cat",
    "The old man",
    "The city",
    "A bird",
    "The sun",
    "The road",
    "A tree",
    "The wind",
    "The sea",
    "The child",
    "A dog",
    "The moon",
    "The hill",
)
_VERBS = ("is", "was", "looks", "seems", "stays", "feels", "became", "remains")
_ADJS = (
    "green",
    "blue",
    "quiet",
    "warm",
    "bright",
    "calm",
    "tall",
    "slow",
    "cold",
    "soft",
    "old",
    "wide",
    "dark",
    "clear",
    "loud",
    "small",
)
_TAILS = (
    "today",
    "again",
    "as always",
    "in the morning",
    "at night",
    "here",
    "there",
    "for now",
    "once more",
    "all day",
)
_NAMES = (
    "Paris",
    "Lima",
    "Oslo",
    "Cairo",
    "Tokyo",
    "Quito",
    "Delhi",
    "Rome",
    "Accra",
    "Hanoi",
    "Dakar",
    "Minsk",
    "Sofia",
    "Doha",
    "Riga",
    "Bern",
    "Kyiv",
    "Suva",
    "Male",
    "Baku",
)


class TaskSample(BaseModel):
    """One prompt with its expected answer; ``answer`` is literally present in ``prompt``."""

    model_config = ConfigDict(frozen=True)
    kind: str
    seed: int
    prompt: str
    answer: str
    target_tokens: int
    needle_depth: float  # where the needle sits, as a fraction of the context
    # Every (key, value) fact of the context, the asked one included (empty for passkey):
    # the training script asks the others as follow-up questions.
    facts: tuple[tuple[str, str], ...] = ()


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJS)} {rng.choice(_TAILS)}. "


TASK_HEADER = "There is important information hidden in the text below. Find it and memorise it.\n"


# The fact and question formats, in one place: the tasks and the training drills of
# benchmarks.train_model both build their text from these.
# The value follows its key after four characters (" is "), as in RULER's JSON kv task; with
# "Key 417 holds value 83920." (13 characters between them) our character-level model never
# learnt to match keys in a CPU budget (it picked some pair's value: chance level).
def kv_fact(key: str, value: str) -> str:
    return f"The value of key {key} is {value}. "


def kv_question(key: str) -> str:
    return f"What is the value of key {key}? The value of key {key} is"


def needle_fact(name: str, number: str) -> str:
    return f"The special magic number for {name} is {number}. "


def needle_question(name: str) -> str:
    return f"What is the special magic number for {name}? The special magic number for {name} is"


FACT_FORMATS: Mapping[str, tuple[Callable[[str, str], str], Callable[[str], str]]] = MappingProxyType(
    {
        "kv_retrieval": (kv_fact, kv_question),
        "needle": (needle_fact, needle_question),
    }
)


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _filler(rng: random.Random, n_chars: int) -> str:
    parts: list[str] = []
    size = 0
    while size < n_chars:
        s = filler_sentence(rng)
        parts.append(s)
        size += len(s)
    return "".join(parts)


def _needles(kind: str, rng: random.Random) -> tuple[list[str], str, str, str, tuple[tuple[str, str], ...]]:
    """(needle sentences, the one that matters, question suffix, answer, (key, value) facts)."""
    if kind == "passkey":
        key = _digits(rng, 5)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        return [needle], needle, "What is the pass key? The pass key is", key, ()
    if kind == "kv_retrieval":
        facts = draw_facts(kind, rng, rng.randint(3, 6))
    elif kind == "needle":
        facts = draw_facts(kind, rng, rng.randint(3, 5))
    else:
        raise ValueError(f"unknown synthetic task kind {kind!r}; choose one of {TASK_KINDS}")
    fact, ask = FACT_FORMATS[kind]
    needles = [fact(k, v) for k, v in facts]
    target = rng.randrange(len(facts))
    key, answer = facts[target]
    return needles, needles[target], ask(key), answer, facts


def draw_facts(kind: str, rng: random.Random, n: int) -> tuple[tuple[str, str], ...]:
    """``n`` distinct keys with their values: three-digit keys and five-digit values for
    kv_retrieval, city names (at most 20) and four-digit numbers for needle."""
    if kind == "kv_retrieval":
        keys, digits = [str(k) for k in rng.sample(range(100, 1000), n)], 5
    else:
        keys, digits = rng.sample(_NAMES, n), 4
    return tuple((k, _digits(rng, digits)) for k in keys)


def make_sample(
    kind: str,
    seed: int,
    target_tokens: int,
    count_tokens: Callable[[str], int] = len,
) -> TaskSample:
    """Build one sample of about ``target_tokens`` tokens (never more), deterministically.

    ``count_tokens`` measures a string in the caller's tokenizer (default: characters,
    which is exact for the character tokenizer of :mod:`benchmarks.tiny_model`).
    """
    if target_tokens < 64:
        raise ValueError(f"target_tokens must be >= 64, got {target_tokens}")
    rng = random.Random(f"{kind}:{seed}:{target_tokens}")
    needles, key_needle, question, answer, facts = _needles(kind, rng)
    depth = rng.random()
    head = TASK_HEADER
    tail = "\n" + question
    fixed = head + "".join(needles) + tail
    # Characters per token of this tokenizer, measured on filler itself.
    probe = _filler(random.Random(seed), 2000)
    chars_per_token = max(len(probe) / max(count_tokens(probe), 1), 1e-3)
    budget_chars = int((target_tokens - count_tokens(fixed)) * chars_per_token)
    if budget_chars <= 0:
        raise ValueError(f"target_tokens={target_tokens} is too short for a {kind} sample")

    def assemble(n_chars: int) -> str:
        filler_rng = random.Random(f"filler:{kind}:{seed}")
        sentences = _filler(filler_rng, n_chars)
        # Cut on sentence boundaries, then insert needles at their depths.
        cut = sentences[:n_chars].rsplit(". ", 1)[0] + ". " if ". " in sentences[:n_chars] else ""
        spans = cut.split(". ")
        slots = sorted(rng_needle_positions(len(spans), len(needles), depth, seed))
        order = list(needles)
        random.Random(f"order:{kind}:{seed}").shuffle(order)
        out: list[str] = []
        j = 0
        for i, span in enumerate(spans):
            while j < len(slots) and slots[j] == i:
                out.append(order[j])
                j += 1
            if span:
                out.append(span.strip() + ". ")
        out.extend(order[j:])
        return head + "".join(out) + tail

    text = assemble(budget_chars)
    while count_tokens(text) > target_tokens and budget_chars > 0:
        budget_chars = int(budget_chars * 0.97) - 1
        text = assemble(budget_chars)
    assert answer in text and key_needle in text
    return TaskSample(
        kind=kind,
        seed=seed,
        prompt=text,
        answer=answer,
        target_tokens=target_tokens,
        needle_depth=depth,
        facts=facts,
    )


def shared_document(
    seed: int, target_tokens: int, n_facts: int, count_tokens: Callable[[str], int] = len
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """One document of at most ``target_tokens`` tokens holding ``n_facts`` kv_retrieval facts spread
    through filler, and the facts: many questions (``"\n" + kv_question(key)``) over one document, the
    shared-prefix workload of eviction-aware prefix caching."""
    rng = random.Random(f"shared:{seed}:{target_tokens}:{n_facts}")
    facts = draw_facts("kv_retrieval", rng, n_facts)
    needles = [kv_fact(k, v) for k, v in facts]
    if count_tokens(TASK_HEADER + "".join(needles)) >= target_tokens:
        raise ValueError(f"{n_facts} facts do not fit in {target_tokens} tokens")
    n_chars = target_tokens * 2
    while True:
        spans = _filler(random.Random(f"shared-filler:{seed}"), n_chars).split(". ")[:-1]
        per = max(len(spans) // (n_facts + 1), 1)
        parts = [TASK_HEADER]
        for i, span in enumerate(spans):
            if i and i % per == 0 and i // per <= n_facts:
                parts.append(needles[i // per - 1])
            parts.append(span.strip() + ". ")
        parts.extend(needles[min(max(len(spans) - 1, 0) // per, n_facts) :])
        text = "".join(parts)
        if count_tokens(text) <= target_tokens:
            return text, facts
        n_chars = int(n_chars * min(0.99, target_tokens / count_tokens(text))) - 1


def rng_needle_positions(n_spans: int, n_needles: int, depth: float, seed: int) -> list[int]:
    """Sentence indices where needles go: the first around ``depth``, the others anywhere."""
    rng = random.Random(f"pos:{seed}:{n_spans}:{n_needles}")
    first = min(int(depth * n_spans), max(n_spans - 1, 0))
    return [first] + [rng.randrange(max(n_spans, 1)) for _ in range(n_needles - 1)]


def score_answer(completion: str, answer: str) -> float:
    """Retrieval accuracy: 1.0 when the completion's first number-like word equals the answer."""
    words = completion.strip().replace(".", " ").replace(",", " ").split()
    return float(bool(words) and words[0] == answer)

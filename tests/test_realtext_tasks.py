"""The real-text tasks (evolve.tasks.realtext): determinism, lengths and needle depths in the
model's own tokens, the train/held-out seed split, scoring. Tokenizer only (no vLLM): the
SmolLM2 tokenizer and the essays that scripts/install.sh fetches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from evolve.assets import ESSAYS_DIR, SMOLLM2_DIR, AssetError
from evolve.tasks import realtext
from evolve.tasks.realtext import (
    HELDOUT_SEED_BASE,
    LENGTH_SLACK,
    REALTEXT_KINDS,
    TRAIN_SEED_LIMIT,
    RealTextSample,
    check_seeds,
    make_sample,
    normalise_essay,
    score_answer,
    seed_split,
)

pytestmark = pytest.mark.skipif(
    not ((SMOLLM2_DIR / "tokenizer.json").exists() and ESSAYS_DIR.is_dir()),
    reason="the real model and the essays are not fetched (python -m benchmarks.models fetch)",
)


@pytest.fixture(scope="module")
def tok():
    return realtext.load_tokenizer(str(SMOLLM2_DIR))


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("kind", REALTEXT_KINDS)
def test_every_kind_fits_its_length_and_holds_its_answers(tok, kind: str) -> None:
    for target in (1024, 4096):
        s = make_sample(kind, 3, target, tok)
        assert s.prompt_tokens == n_tokens(tok, s.prompt)
        assert target - LENGTH_SLACK <= s.prompt_tokens <= target, (kind, target, s.prompt_tokens)
        assert s.prompt.startswith("<|im_start|>system") and "<|im_start|>user\n" in s.prompt
        assert s.prompt.rstrip().endswith(("is", "are", 'is "')), s.prompt[-80:]
        assert s.continuation.strip('" ') == s.answer
        body = s.prompt.split("<|im_start|>assistant")[0]
        for v in (*s.answers, *s.distractors):
            assert v in body, (kind, v)
        assert 0 < s.max_tokens <= 64
        assert s.split == "train"


@pytest.mark.parametrize("kind", ["niah_number", "multivalue", "vartrack"])
def test_same_seed_same_sample_other_seed_other_sample(tok, kind: str) -> None:
    from transformers import AutoTokenizer

    a = make_sample(kind, 11, 2048, tok)
    # a second tokenizer object: the per-tokenizer sentence counts start empty
    b = make_sample(kind, 11, 2048, AutoTokenizer.from_pretrained(str(SMOLLM2_DIR)))
    assert a == b
    c = make_sample(kind, 12, 2048, tok)
    assert c.prompt != a.prompt and c.answers != a.answers


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
def test_needle_depth_is_measured_in_model_tokens(tok, depth: float) -> None:
    s = make_sample("niah_number", 5, 4096, tok, depth=depth)
    needle = next(m for m in re.finditer(r"The special magic number for \w+ is: \d+\.", s.prompt))
    head, rest = s.prompt.split("afterwards.\n\n", 1)
    context = rest.split("\n\nWhat is the special magic number")[0]
    start = len(head) + len("afterwards.\n\n")
    before = n_tokens(tok, s.prompt[start : needle.start()])
    haystack = n_tokens(tok, context) - n_tokens(tok, " " + needle.group(0))
    assert abs(before / haystack - depth) < 0.03, (before, haystack, depth)
    assert abs(s.needle_depths[0] - depth) < 0.03


def test_chains_keep_their_order(tok) -> None:
    for seed in range(5):
        s = make_sample("vartrack", seed, 2048, tok)
        first, second, third = s.answers
        pos = [s.prompt.index(f"VAR {first} = "), s.prompt.index(f"VAR {second} = VAR {first}.")]
        pos.append(s.prompt.index(f"VAR {third} = VAR {second}."))
        assert pos == sorted(pos)


def test_collect_spreads_its_needles_over_the_text(tok) -> None:
    for seed in range(5):
        s = make_sample("collect", seed, 2048, tok)
        assert len(s.needle_depths) == len(s.answers) == 4
        for i, d in enumerate(s.needle_depths):  # one per quarter, within a sentence's tokens
            assert i / 4 - 0.03 <= d <= (i + 1) / 4 + 0.03, s.needle_depths
        named = re.findall(r"One of the special magic numbers for \w+ is: (\d+)\.", s.prompt)
        assert named == list(s.answers)


def test_train_and_heldout_seeds_never_meet(tok) -> None:
    assert seed_split(0) == seed_split(TRAIN_SEED_LIMIT - 1) == "train"
    assert seed_split(HELDOUT_SEED_BASE) == seed_split(HELDOUT_SEED_BASE + 123) == "heldout"
    for bad in (-1, TRAIN_SEED_LIMIT, HELDOUT_SEED_BASE - 1):
        with pytest.raises(ValueError, match="neither a training seed"):
            seed_split(bad)
        with pytest.raises(ValueError, match="neither a training seed"):
            make_sample("niah_number", bad, 1024, tok)
    check_seeds([HELDOUT_SEED_BASE + i for i in range(3)], "heldout")
    with pytest.raises(ValueError, match="is not a heldout seed"):
        check_seeds([HELDOUT_SEED_BASE, 5], "heldout")
    held = make_sample("niah_number", HELDOUT_SEED_BASE, 1024, tok)
    assert held.split == "heldout"
    assert held.prompt != make_sample("niah_number", 0, 1024, tok).prompt


def test_bad_requests(tok, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown real-text task kind 'passkey'"):
        make_sample("passkey", 0, 1024, tok)
    with pytest.raises(ValueError, match="too short"):
        make_sample("multivalue", 0, 200, tok)
    with pytest.raises(ValueError, match="depth must be in"):
        make_sample("niah_number", 0, 1024, tok, depth=1.5)
    with pytest.raises(AssetError, match=r"^essays error: no essays folder"):
        make_sample("niah_number", 0, 1024, tok, essays_dir=tmp_path / "none")


def _sample(kind: str, answers: tuple[str, ...], distractors: tuple[str, ...] = ()) -> RealTextSample:
    return RealTextSample(
        kind=kind,
        seed=0,
        split="train",
        prompt="",
        answer=", ".join(answers),
        continuation=" " + ", ".join(answers),
        answers=answers,
        distractors=distractors,
        target_tokens=1024,
        prompt_tokens=1000,
        needle_depth=0.5,
        needle_depths=(0.5,),
        max_tokens=16,
        essays=(),
    )


def test_scoring() -> None:
    single = _sample("multikey", ("1234567",), ("7654321", "1111111"))
    assert score_answer(" 1234567.", single) == 1.0
    assert score_answer(':\n\n"1234567"', single) == 1.0
    assert score_answer(" 7654321, or maybe 1234567", single) == 0.0  # a distractor named first
    assert score_answer(" 1234567, not 7654321", single) == 1.0
    assert score_answer(" 12345678", single) == 0.0  # the number must stand alone
    assert score_answer("", single) == 0.0
    word = _sample("niah_word", ("Giraffe",))
    assert score_answer(' "giraffe".', word) == 1.0
    assert score_answer(" giraffes", word) == 0.0
    many = _sample("multivalue", ("111", "222", "333", "444"))
    assert score_answer("1. 222\n2. 444\n3. 222", many) == 0.5
    assert score_answer("111 222 333 444", many) == 1.0
    chain = _sample("vartrack", ("ABCDE", "FGHIJ"), ("KLMNO",))
    assert score_answer(" VAR ABCDE = 12345, KLMNO", chain) == 0.5


def test_essays_are_read_as_prose() -> None:
    raw = "July 2010What hard liquor,\ncigarettes are all forms of it.We wouldn't\nwant to stop it."
    assert (
        normalise_essay(raw)
        == "What hard liquor, cigarettes are all forms of it. We wouldn't want to stop it."
    )
    assert realtext.split_sentences(normalise_essay(raw)) == [
        "What hard liquor, cigarettes are all forms of it.",
        "We wouldn't want to stop it.",
    ]


# ---------------------------------------------------------------------------------------------
# wiring: evolution's task config and pool, the quality benchmark's task selection


def test_evolve_draws_realtext_tasks(tok) -> None:
    from evolve.config import validate_config
    from evolve.samples import TaskPool

    task = {"kind": "realtext:multikey", "target_tokens": [1024, 2048], "tokenizer": str(SMOLLM2_DIR)}
    cfg = validate_config({"stages": [{"generations": 1, "tasks": [task]}]})
    tc = cfg.stages[0].tasks[0]
    assert tc.name == "realtext:multikey@1024,2048" and tc.realtext_kind == "multikey"
    pool = TaskPool(tc)
    s = pool.sample(3)
    ref = make_sample("multikey", 3, 2048, tok)
    assert s.prompt == ref.prompt and s.max_tokens == ref.max_tokens
    assert s.answer == ref.continuation == " " + ref.answer  # what a log-likelihood fitness scores
    assert s.score(s.answer) == 1.0 and s.score(" " + ref.distractors[0]) == 0.0
    assert pool.sample(2).prompt != s.prompt


def test_evolve_config_refuses_bad_realtext_tasks(tmp_path: Path) -> None:
    from evolve.config import ConfigError, validate_config

    def check(task: dict, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            validate_config({"stages": [{"generations": 1, "tasks": [task]}]})

    base = {"kind": "realtext:niah_word", "target_tokens": [1024], "tokenizer": str(SMOLLM2_DIR)}
    check({**base, "kind": "realtext:frequent"}, "unknown task kind 'realtext:frequent'")
    check({k: v for k, v in base.items() if k != "tokenizer"}, "needs 'tokenizer'")
    check({**base, "tokenizer": str(tmp_path)}, "no tokenizer files")
    check({**base, "pool_size": TRAIN_SEED_LIMIT + 1}, "not training seeds")
    check({**base, "essays": str(tmp_path / "none")}, "essays error: no essays folder")
    check(
        {"kind": "passkey", "target_tokens": [600], "tokenizer": str(SMOLLM2_DIR)}, "for realtext tasks only"
    )


def test_quality_benchmark_refuses_bad_realtext_input(tmp_path: Path, capsys) -> None:
    from benchmarks.quality import main

    def run(*args: str) -> str:
        assert main(["--tasks", "realtext", "--out", str(tmp_path / "q"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert run("--model", str(tmp_path / "none")).startswith("model error: no model folder")
    assert run("--essays", str(tmp_path / "none")).startswith("essays error: no essays folder")
    assert run("--kinds", "passkey").startswith("quality error: 'passkey' is not a realtext kind")
    assert "neither a training seed" in run("--seed-base", str(TRAIN_SEED_LIMIT))
    assert not (tmp_path / "q").exists()

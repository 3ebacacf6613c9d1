"""The proxy's page decision is select_pages' decision; a replay keeps the budget and what it scores."""

from __future__ import annotations

import pytest
import torch

from evolve.proxy import PreparedPrompt, budget_page_keep, replay
from vllm_namm.page_plan import PagesByBudget, select_pages


@pytest.mark.parametrize("aggregate", ["mean", "max"])
@pytest.mark.parametrize("seed", range(6))
def test_budget_page_keep_is_select_pages(aggregate: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(40, 700, (1,), generator=g))
    positions = torch.sort(torch.randperm(2 * n, generator=g)[:n]).values  # holes, like an evicted cache
    scores = torch.randn(12, n, generator=g)
    if seed % 2:  # ties: coarse scores
        scores = scores.round()
    keep_tokens = int(torch.randint(1, n, (1,), generator=g))
    protected = torch.zeros(n, dtype=torch.bool)
    protected[-1] = True
    plan = select_pages(
        PagesByBudget(list(scores.view(4, 3, n)), positions, 32, keep_tokens, aggregate, protected)
    )
    assert torch.equal(budget_page_keep(scores, positions, 32, keep_tokens, aggregate), plan.token_keep)


def test_replay_keeps_the_budget_and_the_pages_it_scores_best() -> None:
    # 4 steps of 512 tokens; the score is the position itself (newest best), labels on the last 64
    # tokens (kept: the newest pages) and on the first 64 of the second chunk (evicted)
    n_steps, rows = 4, 6
    inputs = [torch.arange(512 * (k + 1), dtype=torch.float32).expand(rows, -1) for k in range(n_steps)]
    positions = [torch.arange(512 * (k + 1)) for k in range(n_steps)]
    labels = torch.zeros(2048, dtype=torch.bool)
    labels[-64:] = True
    labels[512:576] = True
    p = PreparedPrompt(inputs, positions, [512 * (k + 1) - 1 for k in range(n_steps)], labels, (2, 3))
    fact, retained = replay(p, lambda x, idx: x[:, idx], "mean", 0.25, 32)
    assert retained == pytest.approx(512 / 2048)  # 16 pages of 32 of the 2048 tokens
    assert fact == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_prompt() -> tuple[object, list[int]]:
    """A tiny random Llama and a 1100-token prompt for it."""
    transformers = pytest.importorskip("transformers")
    from benchmarks.tiny_model import VOCAB_SIZE, llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(hidden=64, intermediate=128)).eval()
    ids = torch.randint(4, VOCAB_SIZE, (1100,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, ids


@pytest.fixture(scope="module")
def recording(tiny_prompt: tuple[object, list[int]]) -> tuple[dict, dict]:
    """The tiny prompt recorded with EMA 0.99 and 0.999, and with 0.999 alone."""
    from evolve.proxy import record_prompt

    model, ids = tiny_prompt
    labels = torch.zeros(1100, dtype=torch.bool)
    labels[600:640] = True
    return record_prompt(model, ids, labels, [0.99, 0.999]), record_prompt(model, ids, labels, [0.999])


def _l2_weights():
    from evolve.fit import build_weights

    w = torch.zeros(26)
    w[-1] = -1.0  # score = -normalised key norm: the L2 ranking
    ones, zeros = torch.ones(18), torch.zeros(18)
    l2 = build_weights("mlp", None, 0.99, zeros, ones, w, 0.0, {"description": "test"}, key_norm=True)
    l2.page_score = "mean"
    return l2


def test_recording_replays_like_its_own_features(recording: tuple[dict, dict]) -> None:
    """One step per 512 tokens, the second EMA coefficient equals a recording made with it alone,
    and a replay of the L2 ranking at 0.25 keeps a quarter in pages."""
    from evolve.proxy import ProxyScorer

    both, alone = recording
    assert [s["newest"] for s in both["steps"]] == [511, 1023]
    for s, t in zip(both["steps"], alone["steps"], strict=True):
        assert s["ema"]["0.99"].shape == (2, 2, s["positions"].numel(), 17)
        assert torch.equal(s["ema"]["0.999"], t["ema"]["0.999"])
        assert torch.equal(s["key_norm"], t["key_norm"])
    l2 = _l2_weights()
    out = ProxyScorer([both], l2, 0.25, 32, output_only=True)()
    slow = ProxyScorer([both], l2, 0.25, 32, output_only=False)()
    assert out == slow
    assert out["retained"] == pytest.approx(256 / 1024)  # 8 pages of 32 of the 1024 tokens stepped
    assert 0.0 <= out["fact_kept"] <= 1.0


def test_one_shot_recording_is_one_step_at_the_prompt_end(tiny_prompt: tuple[object, list[int]]) -> None:
    """``record --one-shot``: a single step covering the prompt up to its last whole hop."""
    from evolve.proxy import record_prompt, recording_interval

    assert recording_interval(2047, one_shot=True) == 2032 and recording_interval(2047, one_shot=False) == 512
    model, ids = tiny_prompt
    rec = record_prompt(
        model, ids, torch.zeros(1100, dtype=torch.bool), [0.99], recording_interval(1100, True)
    )
    assert [s["newest"] for s in rec["steps"]] == [1087]
    assert rec["steps"][0]["positions"].numel() == 1088


def test_run_exports_a_weights_file_and_resumes(recording: tuple[dict, dict], tmp_path) -> None:
    """Two generations of 4 candidates, then --resume with 3: one more generation, same command in
    the provenance, a file the server's loader reads."""
    from evolve.proxy import main
    from vllm_namm.weights import load_weights, save_weights

    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    torch.save(recording[0], rec_dir / "p.pt")
    save_weights(tmp_path / "start.safetensors", _l2_weights())
    args = [
        "run",
        "--weights",
        str(tmp_path / "start.safetensors"),
        "--train",
        str(rec_dir),
        "--valid",
        str(rec_dir),
    ]
    args += ["--popsize", "4", "--workers", "1", "--eval-every", "1", "--out", str(tmp_path / "evo")]
    assert main([*args, "--generations", "2"]) == 0
    first = load_weights(tmp_path / "evo" / "best.safetensors")
    assert main([*args, "--generations", "3", "--resume"]) == 0
    lines = (tmp_path / "evo" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3
    again = load_weights(tmp_path / "evo" / "best.safetensors")
    assert again.provenance.command == first.provenance.command
    assert again.provenance.command.endswith("--generations 2")  # the first run's command
    assert again.budget_ratio == 0.25 and again.page_score == "mean"
    assert again.provenance.mode == "budget 0.25"  # incremental recordings; one-shot ones say so


def test_start_scores_the_first_spectrogram_bin(tmp_path) -> None:
    """``start``: the base's statistics and shape, a scorer that returns its first-bin input, the
    EMA and page score asked for, and the command in the provenance."""
    from evolve.proxy import main
    from vllm_namm.weights import load_weights

    out = tmp_path / "start.safetensors"
    assert (
        main(["start", "--base", "l2-smollm2", "--ema", "0.9", "--page-score", "max", "--out", str(out)]) == 0
    )
    w, base = load_weights(out), load_weights("l2-smollm2")
    assert w.features.ema_coeff_per_step == 0.9 and w.page_score == "max" and w.scorer == base.scorer
    assert torch.equal(w.norm_mean, base.norm_mean)
    x = torch.randn(3, 50, w.scorer.input_dim)
    scores = w.build_scorer()(x, w.params).reshape(3, 50)
    assert torch.allclose(scores, x[..., w.features.pos_dims])
    assert w.provenance.stages == ["hand:first-bin"]
    assert w.provenance.command.startswith("python -m evolve.proxy start --base l2-smollm2")


def test_bad_input_is_one_line_and_exit_2(recording: tuple[dict, dict], tmp_path, capsys) -> None:
    """No recordings, a corrupt recording, one-shot and incremental recordings mixed, a missing
    model folder: one line each, exit code 2."""
    from evolve.proxy import main

    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "p.pt").write_bytes(b"not a recording")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, one_shot in (("a.pt", True), ("b.pt", False)):
        torch.save({**recording[0], "one_shot": one_shot}, mixed / name)
    for argv, says in (
        (["score", "--recordings", str(empty), "--weights", "l2-smollm2"], "no recordings"),
        (["score", "--recordings", str(corrupt), "--weights", "l2-smollm2"], "cannot be read as a recording"),
        (["score", "--recordings", str(mixed), "--weights", "l2-smollm2"], "mix one-shot (1"),
        (
            [
                "run",
                "--train",
                str(mixed / "a.pt"),
                "--valid",
                str(mixed / "b.pt"),
                "--out",
                str(tmp_path / "e"),
            ],
            "differ in schedule",
        ),
        (["start", "--base", "hand", "--out", str(tmp_path / "s.safetensors")], "needs an MLP"),
        (["start", "--ema", "1.5", "--out", str(tmp_path / "s.safetensors")], "--ema 1.5"),
        (["record", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "rec")], "no model folder"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err and "Traceback" not in err

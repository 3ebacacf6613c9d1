"""Train vllm-namm's own small long-context Llama on synthetic retrieval tasks.

No model weights can be downloaded in this project, so eviction quality is measured
on a model we train ourselves: a standard HF ``LlamaForCausalLM`` (RoPE, GQA, so vLLM
serves it natively) over the character tokenizer of :mod:`benchmarks.tiny_model`,
trained on the exact prompt formats of :mod:`evolve.tasks.synthetic`.

Usage::

    python -m benchmarks.train_model --out benchmarks/models/namm-tiny-llama            # CPU preset
    python -m benchmarks.train_model --out DIR --preset gpu --device cuda
    python -m benchmarks.train_model --out DIR --eval-only [--eval-samples 30]

Data (generated on the fly, deterministic given ``--seed``)
    * one ``make_sample(kind, seed, length)`` per sequence, kinds passkey / kv_retrieval /
      needle; **training seeds are drawn from [0, 10**7)**, **evaluation seeds are
      10**9 + i** (held out: ``make_sample`` seeds its RNG with ``kind:seed:length``);
    * the sequence is ``prompt + " " + answer + "." + </s>``; for kv_retrieval and needle
      the other key/value pairs of the same context are then asked as follow-up
      questions in the same format (``"\\n" + question + " " + value + "." + </s>``),
      which multiplies the supervised answers per (expensive) long context;
    * loss = mean CE over answer tokens (" " + digits + "." + </s>)
      + ``ctx_weight`` x mean CE over all other tokens (filler is noise, but a little LM
      loss on it teaches the local "previous tokens" features that induction needs).

Length generalisation (train at <= 2k, evaluate at 4k-8k)
    * large ``rope_theta`` (5e5): the low-frequency RoPE dimensions barely rotate over
      8k tokens, so a content-matching (induction) head can use them as if there were no
      positions at all, while the high-frequency dimensions serve the local heads;
    * PoSE-style positional skips (Zhu et al. 2023): in a fraction of the sequences the
      position ids jump by a random offset at a random point, so relative distances up
      to ``pose_max`` (> 8k) are seen while only <= 2k tokens are computed;
    * a short length curriculum (512 -> 1024 -> 2048 tokens) at a constant token budget
      per step.

Evaluation (``--eval-only`` or after training): greedy ``model.generate`` (max 8 new
tokens) on held-out seeds at 1k/2k/4k/8k tokens, accuracy per kind and length, with the
full prompt and with a naive cache cut proxy: the middle of the prompt removed, keeping
the first 64 + last 25 % of the tokens (what "streaming" at a 25 % cache would keep).

Outputs next to the model: ``config.json``, ``model.safetensors``, tokenizer files,
``training_log.json`` (command, wall time, preset, curve, final accuracy) and ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.results import command_line
from benchmarks.tiny_model import build_tokenizer, llama_config
from evolve.tasks.synthetic import (
    FACT_FORMATS,
    TASK_HEADER,
    TASK_KINDS,
    TaskSample,
    draw_facts,
    filler_sentence,
    make_sample,
    score_answer,
)

TRAIN_SEED_RANGE = (0, 10**7)
EVAL_SEED_BASE = 10**9
MIN_TRAIN_LENGTH = 512  # shorter kv_retrieval / needle samples do not always fit


def stage(length: int, steps: int, tokens: int, **mix: float) -> dict:
    return {"length": length, "steps": steps, "tokens": tokens, "mix": mix}


@dataclass
class Preset:
    # model
    layers: int = 3
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    rope_theta: float = 500_000.0
    max_positions: int = 16384
    # training stages: sequence length, steps, tokens per step, and the mix of sequence types:
    # "perm" / "copy" induction drills, "drill" dense recall drills, "task" real make_sample tasks
    stages: list[dict] = field(
        default_factory=lambda: [
            stage(96, 1000, 1536, perm=0.6, copy=0.4),
            stage(256, 500, 2048, copy=0.3, drill=0.7),
            stage(512, 300, 4096, copy=0.1, drill=0.4, task=0.5),
            stage(1024, 200, 8192, drill=0.3, task=0.7),
            stage(2048, 100, 8192, drill=0.2, task=0.8),
        ]
    )
    lr: float = 3e-3
    init_std: float = 0.02
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    ctx_weight: float = 0.2
    pose_prob: float = 0.5
    pose_max: int = 10240
    kind_weights: tuple[float, float, float] = (0.25, 0.40, 0.35)  # passkey, kv_retrieval, needle
    eval_every: int = 200
    # final evaluation
    eval_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    eval_samples: int = 30


PRESETS: dict[str, Preset] = {
    "cpu": Preset(),
    # For a lent GPU: wider, deeper, longer, trains up to 4k with skips to 16k.
    "gpu": Preset(
        layers=4,
        hidden=256,
        heads=8,
        kv_heads=2,
        intermediate=768,
        max_positions=32768,
        stages=[
            stage(96, 3000, 4096, perm=0.5, copy=0.5),
            stage(256, 2000, 8192, copy=0.3, drill=0.7),
            stage(512, 2000, 16384, copy=0.1, drill=0.4, task=0.5),
            stage(1024, 2000, 32768, drill=0.3, task=0.7),
            stage(2048, 2000, 32768, drill=0.2, task=0.8),
            stage(4096, 1000, 32768, drill=0.2, task=0.8),
        ],
        lr=2e-3,
        warmup=300,
        pose_max=20480,
        eval_every=250,
        eval_samples=100,
    ),
    # Continuation of "cpu" (``--init-from`` its output): dense kv/needle drills first, then
    # the real tasks up to 2k tokens; more kv_retrieval, lower lr. Run twice (seeds 0, 1).
    "cpu-finetune": Preset(
        stages=[
            stage(256, 300, 4096, drill=1.0),
            stage(512, 250, 4096, drill=0.4, task=0.6),
            stage(1024, 150, 8192, drill=0.3, task=0.7),
            stage(2048, 100, 8192, drill=0.2, task=0.8),
        ],
        lr=1.5e-3,
        warmup=20,
        kind_weights=(0.1, 0.6, 0.3),
        eval_every=100,
    ),
    # Pipeline check: a couple of minutes on one CPU thread.
    "smoke": Preset(
        stages=[
            stage(96, 10, 1536, perm=0.5, copy=0.5),
            stage(512, 10, 4096, drill=0.5, task=0.5),
            stage(1024, 10, 8192, task=1.0),
        ],
        eval_every=10,
        warmup=5,
        eval_lengths=(1024, 2048),
        eval_samples=3,
    ),
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class CharCodec:
    """Exact char <-> id map of the character tokenizer (fast path for building batches)."""

    def __init__(self):
        self.tokenizer = build_tokenizer()
        vocab = self.tokenizer.get_vocab()
        # In id order: get_vocab()'s order changes between processes, and the perm drill
        # samples from this dict's keys, so the data would not be deterministic given the seed.
        self.char_to_id = {c: i for c, i in sorted(vocab.items(), key=lambda item: item[1]) if len(c) == 1}
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        return [self.char_to_id[c] for c in text]


def follow_up_questions(s: TaskSample, rng: random.Random) -> list[tuple[str, str]]:
    """The other key/value facts of the context, asked in the same format as the sample's question."""
    if s.kind not in FACT_FORMATS:
        return []
    ask = FACT_FORMATS[s.kind][1]
    out = [(ask(k), v) for k, v in s.facts if v != s.answer]
    rng.shuffle(out)
    return out


def build_perm_example(codec: CharCodec, rng: random.Random, length: int) -> tuple[list[int], list[int]]:
    """Simplest induction drill: distinct characters, then the same characters again (copy weighted)."""
    chars = [c for c in codec.char_to_id if c.isalnum()]
    first = codec.encode("".join(rng.sample(chars, min(len(chars), max(8, length // 2)))))
    return first + first, [0] + [1] * (len(first) - 1) + [2] * len(first)


def build_copy_example(codec: CharCodec, rng: random.Random, length: int) -> tuple[list[int], list[int]]:
    """Induction drill: a list of random numbers and words, then the same list again (the copy is
    answer-weighted). The classic fast way to grow induction heads, which retrieval builds on."""
    items: list[str] = []
    while sum(len(x) + 1 for x in items) < (length - 90) // 2:
        if rng.random() < 0.5:
            n = rng.randint(3, 5)
            items.append(str(rng.randrange(10 ** (n - 1), 10**n)))
        else:
            items.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))))
    listing = " ".join(items) + "."
    first = codec.encode(TASK_HEADER + listing + "\nRepeat it: ")
    second = codec.encode(listing) + [codec.eos]
    return first + second, [0] + [1] * (len(first) - 1) + [2] * len(second)


def build_dense_example(
    codec: CharCodec, rng: random.Random, length: int, kind_weights: tuple[float, float] = (1.0, 1.0)
) -> tuple[list[int], list[int]]:
    """A recall drill in the kv_retrieval / needle formats: many facts in short filler, all asked.

    Bootstraps the induction-style retrieval circuit: ~10 supervised answers per ~500 tokens
    at short distances, instead of one answer per long, mostly-noise context.
    """
    kind = rng.choices(list(FACT_FORMATS), weights=kind_weights)[0]
    fact, ask = FACT_FORMATS[kind]
    n_pairs = max(2, min(12, (length - 90) // 100 + rng.randint(-1, 1)))
    asked = list(draw_facts(kind, rng, n_pairs if kind == "kv_retrieval" else min(n_pairs, 8)))
    facts = [fact(k, v) for k, v in asked]
    rng.shuffle(asked)
    q_chars = sum(len(ask(k)) + len(v) + 4 for k, v in asked)
    body_budget = max(0, length - q_chars - sum(map(len, facts)) - 90)
    filler = []
    while sum(map(len, filler)) < body_budget:
        filler.append(filler_sentence(rng))
    pieces = facts + filler
    rng.shuffle(pieces)
    text = TASK_HEADER + "".join(pieces)
    ids = codec.encode(text)
    cls = [0] + [1] * (len(ids) - 1)
    for i, (k, v) in enumerate(asked):
        q = codec.encode("\n" + ask(k))
        ids.extend(q)
        cls.extend([1 if i == 0 else 0] + [1] * (len(q) - 1))
        a = codec.encode(f" {v}.") + [codec.eos]
        ids.extend(a)
        cls.extend([2] * len(a))
    return ids, cls


def build_example(
    codec: CharCodec, kind: str, seed: int, length: int, rng: random.Random, follow_ups: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids and a per-token label class (0: no loss, 1: context LM loss, 2: answer loss).

    The class is for the token *itself* (the label); shifting happens in the loss.
    """
    s = make_sample(kind, seed, length)
    ids = codec.encode(s.prompt)
    cls = [1] * len(ids)
    cls[0] = 0

    def add_answer(value: str):
        a = codec.encode(f" {value}.") + [codec.eos]
        ids.extend(a)
        cls.extend([2] * len(a))

    add_answer(s.answer)
    if follow_ups:
        for question, value in follow_up_questions(s, rng):
            q = codec.encode("\n" + question)
            ids.extend(q)
            cls.extend([0] + [1] * (len(q) - 1))  # whether a follow-up comes is unpredictable
            add_answer(value)
    return ids, cls


class Batcher:
    """Deterministic stream of training batches for a given seed."""

    def __init__(self, codec: CharCodec, preset: Preset, seed: int):
        self.codec = codec
        self.p = preset
        self.rng = random.Random(f"train-data:{seed}")

    def _task_example(self, kind: str, length: int):
        while True:
            seed = self.rng.randrange(*TRAIN_SEED_RANGE)
            try:
                return build_example(self.codec, kind, seed, max(length, MIN_TRAIN_LENGTH), self.rng)
            except ValueError:  # too short for this sample's needles: draw another seed
                continue

    def batch(self, st: dict):
        p, rng, length = self.p, self.rng, st["length"]
        bsz = max(1, st["tokens"] // length)
        kinds, weights = zip(*st["mix"].items(), strict=True)
        seqs, classes, positions = [], [], []
        for _ in range(bsz):
            source = rng.choices(kinds, weights=weights)[0]
            if source == "perm":
                ids, cls = build_perm_example(self.codec, rng, length)
            elif source == "copy":
                ids, cls = build_copy_example(self.codec, rng, length)
            elif source == "drill":
                ids, cls = build_dense_example(self.codec, rng, length, p.kind_weights[1:])
            else:
                kind = rng.choices(TASK_KINDS, weights=p.kind_weights)[0]
                ids, cls = self._task_example(kind, length)
            pos = list(range(len(ids)))
            if p.pose_max > length and rng.random() < p.pose_prob:
                skip = rng.randrange(0, max(1, p.pose_max - len(ids)))
                split = rng.randrange(1, len(ids))
                pos = pos[:split] + [q + skip for q in pos[split:]]
            seqs.append(ids)
            classes.append(cls)
            positions.append(pos)
        width = max(len(s) for s in seqs)
        pad = self.codec.pad
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        label_cls = torch.tensor([c + [0] * (width - len(c)) for c in classes])
        position_ids = torch.tensor(
            [q + list(range(q[-1] + 1, q[-1] + 1 + width - len(q))) for q in positions]
        )
        return input_ids, label_cls, position_ids


def weighted_loss(logits: torch.Tensor, input_ids: torch.Tensor, label_cls: torch.Tensor, ctx_weight: float):
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    cls = label_cls[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none").view_as(
        labels
    )
    ans = cls == 2
    ctx = cls == 1
    ans_loss = (ce * ans).sum() / ans.sum().clamp(min=1)
    ctx_loss = (ce * ctx).sum() / ctx.sum().clamp(min=1)
    return ans_loss + ctx_weight * ctx_loss, ans_loss.detach(), ctx_loss.detach()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def eval_sample(kind: str, i: int, length: int):
    return make_sample(kind, EVAL_SEED_BASE + i, length)


def truncate_middle(ids: list[int], keep_first: int = 64, keep_frac: float = 0.25) -> list[int]:
    """Naive cache-cut proxy: keep the first ``keep_first`` and the last ``keep_frac`` of the tokens."""
    tail = math.ceil(len(ids) * keep_frac)
    if keep_first + tail >= len(ids):
        return ids
    return ids[:keep_first] + ids[-tail:]


@torch.no_grad()
def teacher_forced_accuracy(model, codec: CharCodec, lengths, n: int, device) -> dict:
    """Cheap periodic check: all answer tokens (" " + digits + ".") argmax-correct given the prompt."""
    model.eval()
    out = {}
    for kind in TASK_KINDS:
        for length in lengths:
            hits = 0
            for i in range(n):
                s = eval_sample(kind, i, length)
                ids = codec.encode(s.prompt)
                ans = codec.encode(f" {s.answer}.")
                x = torch.tensor([ids + ans], device=device)
                pred = model(input_ids=x).logits[0, len(ids) - 1 : -1].argmax(-1).tolist()
                hits += pred == ans
            out[f"{kind}@{length}"] = hits / n
    model.train()
    return out


@torch.no_grad()
def evaluate(model, codec: CharCodec, lengths, n: int, device, truncated: bool, show=True) -> dict:
    """Greedy generation accuracy per kind and length: {kind: {length: acc}}."""
    from tqdm import tqdm

    model.eval()
    results: dict[str, dict[str, float]] = {k: {} for k in TASK_KINDS}
    jobs = [(k, length) for length in lengths for k in TASK_KINDS]
    bar = tqdm(
        total=len(jobs) * n,
        desc="eval-truncated" if truncated else "eval-full",
        disable=not show,
        mininterval=5,
    )
    for kind, length in jobs:
        score = 0.0
        for i in range(n):
            s = eval_sample(kind, i, length)
            ids = codec.encode(s.prompt)
            if truncated:
                ids = truncate_middle(ids)
            x = torch.tensor([ids], device=device)
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=codec.eos,
                pad_token_id=codec.pad,
            )
            completion = codec.tokenizer.decode(y[0, len(ids) :].tolist(), skip_special_tokens=True)
            score += score_answer(completion, s.answer)
            bar.update(1)
        results[kind][str(length)] = score / n
    bar.close()
    return results


def format_table(full: dict, trunc: dict | None) -> str:
    lengths = list(next(iter(full.values())).keys())
    head = "| kind | " + " | ".join(f"{L} full" + (f" | {L} cut25%" if trunc else "") for L in lengths) + " |"
    sep = "|" + "---|" * (1 + len(lengths) * (2 if trunc else 1))
    rows = [head, sep]
    for kind in full:
        cells = []
        for L in lengths:
            cells.append(f"{full[kind][L]:.2f}")
            if trunc:
                cells.append(f"{trunc[kind][L]:.2f}")
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def build_model(p: Preset, seed: int):
    from transformers import LlamaForCausalLM

    config = llama_config(
        layers=p.layers,
        hidden=p.hidden,
        heads=p.heads,
        kv_heads=p.kv_heads,
        intermediate=p.intermediate,
        max_positions=p.max_positions,
        rope_theta=p.rope_theta,
    )
    config._attn_implementation = "sdpa"
    config.initializer_range = p.init_std
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32)


def lr_at(step: int, total: int, p: Preset) -> float:
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    t = (step - p.warmup) / max(1, total - p.warmup)
    return p.lr * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def save_model(model, codec: CharCodec, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    codec.tokenizer.save_pretrained(out)


def plot_curve(log: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = log["curve"]
    if not curve:
        return
    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))

    def smooth(xs, k=25):
        out, acc = [], []
        for x in xs:
            acc = (acc + [x])[-k:]
            out.append(sum(acc) / len(acc))
        return out

    for key, label, color in (("answer_loss", "answer CE", "C0"), ("context_loss", "context CE", "C1")):
        ys = [c[key] for c in curve]
        ax[0].plot(steps, ys, color=color, lw=0.5, alpha=0.25)
        ax[0].plot(steps, smooth(ys), color=color, lw=1.2, label=f"{label} (25-step mean)")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy (nats/token)")
    start = 0
    for st in log["preset"]["stages"]:
        ax[0].axvline(start, color="grey", ls=":", lw=0.8)
        ax[0].text(start, ax[0].get_ylim()[1], f" {st['length']}", va="top", fontsize=8)
        start += st["steps"]
    ax[0].legend()
    ax[0].set_title("training loss (length stages dotted)")
    for key in sorted({k for e in log["periodic_eval"] for k in e["acc"]}):
        ax[1].plot(
            [e["step"] for e in log["periodic_eval"]],
            [e["acc"][key] for e in log["periodic_eval"]],
            marker=".",
            label=key,
        )
    ax[1].set_ylim(-0.02, 1.02)
    ax[1].set_xlabel("step")
    ax[1].set_title("held-out teacher-forced answer accuracy")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)


def train(args, p: Preset, log: dict):
    from tqdm import tqdm

    device = torch.device(args.device)
    codec = CharCodec()
    if args.init_from:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).to(device)
        prev = Path(args.init_from) / "training_log.json"
        if prev.exists():
            log["init_from_log"] = {k: v for k, v in json.loads(prev.read_text()).items() if k != "curve"}
        torch.manual_seed(args.seed)
    else:
        model = build_model(p, args.seed).to(device)
    model.train()
    n_params = sum(x.numel() for x in model.parameters())
    decay = [x for n, x in model.named_parameters() if x.dim() >= 2 and "embed" not in n]
    no_decay = [x for n, x in model.named_parameters() if not (x.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.lr,
        betas=(0.9, 0.98),
    )
    batcher = Batcher(codec, p, args.seed)
    total = sum(st["steps"] for st in p.stages)
    schedule = [st for st in p.stages for _ in range(st["steps"])]
    log.update(parameters=n_params, total_steps=total, curve=[], periodic_eval=[], tokens_seen=0)
    deadline = time.time() + args.minutes * 60 if args.minutes else None
    check_lengths = sorted({min(p.stages[-1]["length"] * 2, 4096), 1024})
    bar = tqdm(total=total, desc="train", mininterval=10)
    t0 = time.time()
    ema = None
    for step, st in enumerate(schedule):
        length = st["length"]
        if deadline and time.time() > deadline:
            log["stopped_early"] = f"--minutes {args.minutes} reached at step {step}/{total}"
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, p)
        input_ids, label_cls, position_ids = (t.to(device) for t in batcher.batch(st))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            # An explicit (all-ones) 2D mask: without one, transformers reads any jump in position_ids
            # as a packed-sequence boundary and would block attention across the PoSE skip.
            logits = model(
                input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids)
            ).logits
        loss, ans_loss, ctx_loss = weighted_loss(logits, input_ids, label_cls, p.ctx_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["tokens_seen"] += int(input_ids.numel())
        a, c = ans_loss.item(), ctx_loss.item()
        ema = a if ema is None else 0.95 * ema + 0.05 * a
        log["curve"].append(
            {
                "step": step,
                "length": length,
                "answer_loss": round(a, 5),
                "context_loss": round(c, 5),
                "lr": opt.param_groups[0]["lr"],
                "time_s": round(time.time() - t0, 1),
            }
        )
        bar.set_postfix(
            L=length, ans=f"{ema:.3f}", ctx=f"{c:.3f}", tok_s=f"{log['tokens_seen'] / (time.time() - t0):.0f}"
        )
        bar.update(1)
        if (step + 1) % p.eval_every == 0 or step + 1 == total:
            acc = teacher_forced_accuracy(
                model, codec, check_lengths, 8 if device.type == "cpu" else 32, device
            )
            log["periodic_eval"].append({"step": step + 1, "time_s": round(time.time() - t0, 1), "acc": acc})
            tqdm.write(f"step {step + 1}: {json.dumps(acc)}")
            save_model(model, codec, args.out)
            log["train_wall_s"] = round(time.time() - t0, 1)
            write_log(args.out, log)
            plot_curve(log, args.out)
    bar.close()
    log["train_wall_s"] = round(time.time() - t0, 1)
    log["steps_done"] = len(log["curve"])
    model.eval()
    save_model(model, codec, args.out)
    return model, codec


def write_log(out: Path, log: dict):
    (out / "training_log.json").write_text(json.dumps(log, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/models/namm-tiny-llama"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock cap on training (the run stays deterministic unless the cap is hit)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--init-from", default=None, help="start from this checkpoint instead of a random init"
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate the model in --out, no training")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out samples per kind and length")
    parser.add_argument(
        "--eval-lengths", type=str, default=None, help="comma-separated, e.g. 1024,2048,4096,8192"
    )
    parser.add_argument("--no-truncated-eval", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    n_eval = args.eval_samples or p.eval_samples
    lengths = tuple(int(x) for x in args.eval_lengths.split(",")) if args.eval_lengths else p.eval_lengths
    start = time.time()
    device = torch.device(args.device)
    log_path = args.out / "training_log.json"

    if args.eval_only:
        from transformers import LlamaForCausalLM

        codec = CharCodec()
        model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device).eval()
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        log = {
            "command": command_line("python -m benchmarks.train_model"),
            "preset_name": args.preset,
            "preset": asdict(p),
            "seed": args.seed,
            "device": args.device,
            "threads": args.threads,
            "torch": torch.__version__,
            "train_seeds": f"[{TRAIN_SEED_RANGE[0]}, {TRAIN_SEED_RANGE[1]})",
            "eval_seeds": f"{EVAL_SEED_BASE} + i, i < eval_samples",
        }
        model, codec = train(args, p, log)

    t_eval = time.time()
    full = evaluate(model, codec, lengths, n_eval, device, truncated=False)
    trunc = (
        None if args.no_truncated_eval else evaluate(model, codec, lengths, n_eval, device, truncated=True)
    )
    table = format_table(full, trunc)
    print(table)
    log["final_eval"] = {
        "samples_per_cell": n_eval,
        "lengths": list(lengths),
        "method": "HF greedy generate, max_new_tokens=8, score_answer",
        "full_cache": full,
        "truncated_first64_last25pct": trunc,
        "eval_wall_s": round(time.time() - t_eval, 1),
        "table": table,
    }
    if not args.eval_only:
        log["wall_s"] = round(time.time() - start, 1)
    write_log(args.out, log)
    if "curve" in log:
        plot_curve(log, args.out)


if __name__ == "__main__":
    main()

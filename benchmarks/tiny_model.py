"""Tiny Llama checkpoints and a character-level tokenizer, built locally.

Nothing may be downloaded here, so tests, the demo and the model we train ourselves
all use this tokenizer: one token per printable ASCII character (plus newline).
Character tokens make synthetic retrieval answers exact to decode (no merges, no
spaces inserted between digits) and keep the vocabulary, hence the model, tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARSET = (*(chr(i) for i in range(32, 127)), "\n")
VOCAB_SIZE = 128  # 4 specials + 96 characters, padded to a multiple of 64


def build_tokenizer():
    """A fast HF tokenizer that maps every character to one token and decodes exactly."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARSET)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1 << 20,
    )


def llama_config(
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    max_positions: int = 16384,
    rope_theta: float = 10000.0,
):
    from transformers import LlamaConfig

    tokenizer = build_tokenizer()
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def build_random_llama(path: str | Path, *, seed: int = 0, init_std: float = 0.5, **config_kwargs) -> Path:
    """Write a random-initialised Llama (HF format, safetensors) and the tokenizer to ``path``.

    ``init_std`` is large on purpose: a default-initialised tiny model attends almost
    uniformly, which makes every eviction policy look alike in tests.
    """
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = llama_config(**config_kwargs)
    config.initializer_range = init_std / (config.hidden_size**0.5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    (path / "namm_model_card.json").write_text(json.dumps({"kind": "random tiny llama", "seed": seed}))
    return path


def gemma3_config(
    *,
    layers: int = 6,
    sliding_every: int = 6,
    sliding_window: int = 256,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    max_positions: int = 16384,
):
    """A tiny Gemma 3 text config: every ``sliding_every``-th layer full attention, the others
    sliding-window (Gemma 3's 5:1 pattern at the default 6), so vLLM serves it as a hybrid model."""
    from transformers import Gemma3TextConfig

    tokenizer = build_tokenizer()
    types = ["full_attention" if (i + 1) % sliding_every == 0 else "sliding_attention" for i in range(layers)]
    return Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        query_pre_attn_scalar=hidden // heads,
        sliding_window=sliding_window,
        layer_types=types,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )


def build_random_gemma3(path: str | Path, *, seed: int = 0, init_std: float = 0.5, **config_kwargs) -> Path:
    """Write a random-initialised hybrid Gemma 3 text model (sliding-window and full-attention layers,
    HF format) and the tokenizer to ``path``: the smallest model vLLM serves with several KV-cache groups."""
    from transformers import Gemma3ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = gemma3_config(**config_kwargs)
    config.initializer_range = init_std / (config.hidden_size**0.5)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    (path / "namm_model_card.json").write_text(json.dumps({"kind": "random tiny gemma3", "seed": seed}))
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random Llama + char tokenizer")
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(build_random_llama(args.path, seed=args.seed, layers=args.layers))

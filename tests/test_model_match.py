"""Weights know the model they were evolved for; a server on another model says so once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vllm_namm.model_match import ModelShape, foreign_model_note, shape_of_config, shape_of_model
from vllm_namm.weights import Provenance, load_weights, save_weights

TINY = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "namm-tiny-llama"

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "vocab_size": 49152,
}


def test_shape_of_config_reads_the_attention_geometry() -> None:
    shape = shape_of_config(LLAMA)
    assert shape == ModelShape(
        architecture="LlamaForCausalLM", layers=30, kv_heads=3, hidden_size=576, vocab_size=49152
    )
    no_gqa = {k: v for k, v in LLAMA.items() if k != "num_key_value_heads"}
    assert shape_of_config(no_gqa).kv_heads == 9  # type: ignore[union-attr]
    nested = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": dict(LLAMA)}
    assert shape_of_config(nested).layers == 30  # type: ignore[union-attr]
    assert shape_of_config({"architectures": ["X"]}) is None


def test_shape_of_model_reads_a_local_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert shape_of_model(tmp_path) == shape_of_config(LLAMA)
    assert shape_of_model(tmp_path / "missing") is None
    assert shape_of_model("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert shape_of_model(None) is None


def test_note_only_for_a_known_different_model() -> None:
    smol = shape_of_config(LLAMA)
    tiny = smol.model_copy(update={"layers": 3, "kv_heads": 2, "hidden_size": 128, "vocab_size": 128})  # type: ignore[union-attr]
    note = foreign_model_note("evolved", tiny, "namm-tiny-llama", smol)
    assert note is not None and "evolved" in note and "namm-tiny-llama" in note
    assert "30 layers" in note and "3 layers" in note and "\n" not in note
    assert foreign_model_note("evolved", smol, "x", smol) is None
    assert foreign_model_note("evolved", None, None, smol) is None
    assert foreign_model_note("evolved", tiny, "x", None) is None


def test_weights_keep_their_model_shape(tmp_path: Path) -> None:
    w = load_weights(
        Path(__file__).resolve().parents[1] / "vllm_namm" / "data" / "evolved_l2_tiny_llama.safetensors"
    )
    shape = shape_of_model(TINY)
    assert shape is not None
    w.provenance = (w.provenance or Provenance()).model_copy(update={"model_shape": shape})
    save_weights(tmp_path / "w.safetensors", w)
    back = load_weights(tmp_path / "w.safetensors")
    assert back.provenance is not None and back.provenance.model_shape == shape
    assert torch.equal(back.params, w.params)


def test_the_server_logs_foreign_weights_once(caplog, tmp_path: Path) -> None:
    """``prepare_engine_args``' note: the default (tiny-model) weights on a SmolLM2-shaped model."""
    from vllm_namm.config import EvictionConfig
    from vllm_namm.policies import make_policy
    from vllm_namm.vllm_patch.served_weights import note_foreign_weights

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    cfg = EvictionConfig(policy="namm", weights="evolved-kn")  # tiny-model weights
    policy = make_policy(cfg)
    with caplog.at_level(logging.WARNING, logger="vllm.namm"):
        note_foreign_weights(policy, cfg, str(tmp_path))
        note_foreign_weights(policy, cfg, str(TINY))
    lines = [r.getMessage() for r in caplog.records if "were evolved for" in r.getMessage()]
    assert len(lines) == 1 and "30 layers" in lines[0]


def test_namm_without_weights_gets_the_shipped_weights_of_its_model(tmp_path: Path) -> None:
    """A SmolLM2-shaped model gets the weights shipped for SmolLM2, in the engine args too; an
    explicit --namm-weights, another policy and a model nothing was shipped for keep theirs."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_namm.config import EvictionConfig
    from vllm_namm.shipped_weights import SHIPPED_WEIGHTS
    from vllm_namm.vllm_patch.engine_config import CONFIG_KEY, eviction_config, prepare_engine_args
    from vllm_namm.vllm_patch.served_weights import weights_for_served_model
    from vllm_namm.weights import shipped_weights_for

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    match = shipped_weights_for(shape_of_model(tmp_path))
    assert match is not None and SHIPPED_WEIGHTS[match[0]] == match[1] and "smollm2" in match[0]
    assert shipped_weights_for(shape_of_model(TINY)) == ("evolved", SHIPPED_WEIGHTS["evolved"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(LLAMA | {"num_hidden_layers": 12}))
    assert shipped_weights_for(shape_of_model(other)) is None

    namm = EvictionConfig(policy="namm")
    assert weights_for_served_model(namm, str(tmp_path)) == (
        namm.model_copy(update={"weights": match[1]}),
        match[0],
    )
    explicit = EvictionConfig(policy="namm", weights="evolved")
    assert weights_for_served_model(explicit, str(tmp_path)) == (explicit, None)
    h2o = EvictionConfig(policy="h2o", budget={"ratio": 0.25})
    assert weights_for_served_model(h2o, str(tmp_path)) == (h2o, None)
    assert weights_for_served_model(namm, str(other)) == (namm, None)

    args = EngineArgs(model=str(tmp_path), additional_config={CONFIG_KEY: namm.model_dump(mode="json")})
    prepare_engine_args(args)
    assert eviction_config(args).weights == match[1]  # type: ignore[union-attr]  # what the engine reads

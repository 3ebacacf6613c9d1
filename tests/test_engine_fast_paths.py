"""A served request frees exactly the same pages on the fast paths as on the slow definitions.

``--namm-kernels reference`` runs every eviction step with the plain-torch definitions
(explicit softmax columns, rfft STFT, n x n BAM); the default runs the exact fast paths
(blocked columns, matmul STFT, SDPA/skip BAM, one batched scorer call, background thread).
The same requests through vLLM's engine (in-process ``LLM``, the cheapest full engine) must
report the same evicted page lists and generate the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.launch import ROOT
from vllm_namm.weights import NammWeights, save_weights

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

SCRIPT = r"""
import json, random, sys
from vllm import LLM, SamplingParams
model, cfg = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model, dtype="float32", enforce_eager=True, block_size=32, max_model_len=4096, seed=0,
          additional_config={"namm": cfg})
rng = random.Random(0)
alphabet = "abcdefghijklmnopqrstuvwxyz ,.;:!?\n0123456789"
prompts = ["".join(rng.choice(alphabet) for _ in range(n)) for n in (1800, 1100, 1500)]
per_request = [None, None, {"kv_eviction": "h2o", "kv_eviction_ratio": 0.3}]  # namm, namm, h2o
params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, extra_args=x) for x in per_request]
outs = llm.generate(prompts, params)
print("RESULT " + json.dumps([[list(o.outputs[0].token_ids), (o.kv_transfer_params or {}).get("namm")]
                              for o in outs]))
"""


def serve_once(model: Path, cfg: dict) -> list:
    env = dict(os.environ) | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_served_requests_free_the_same_pages_on_fast_and_reference_paths(tiny_model, tmp_path):
    """Two NAMM requests (random non-zero weights: BAM's attention is computed, not skipped) and
    one H2O request (per-request settings), batched together, on each path."""
    w = NammWeights.zeros()
    w.params = 0.3 * torch.randn(w.params.shape, generator=torch.Generator().manual_seed(0))
    save_weights(tmp_path / "w.safetensors", w)
    cfg = {"policy": "namm", "weights": str(tmp_path / "w.safetensors"), "page_rule": "majority"}
    slow = serve_once(tiny_model, cfg | {"kernels": "reference"})
    fast = serve_once(tiny_model, cfg | {"kernels": "torch"})
    pages = [s["evicted_pages"] for _, s in slow]
    assert all(pages), f"a request evicted nothing: the comparison would be empty ({pages})"
    assert [s["evicted_pages"] for _, s in fast] == pages
    assert [tokens for tokens, _ in fast] == [tokens for tokens, _ in slow]

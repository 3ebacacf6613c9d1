"""Models of the benchmarks: our tiny trained Llama (committed files) and the fetched real model.

``python -m benchmarks.models fetch`` downloads and converts the real-model assets (see
:mod:`benchmarks.models.fetch`); the checks every command runs on them live in
:mod:`evolve.assets`.
"""

"""``python -m evolve``: evolve NAMM scorer weights with CMA-ES against a running vLLM server.

Start the server first, with the weights file you evolve from::

    vllm serve MODEL --kv-eviction namm --namm-weights start.safetensors

then::

    python -m evolve --config evolve/configs/stage1_passkey.json --weights start.safetensors \\
        --base-url http://127.0.0.1:8000/v1 --out runs/stage1

Interrupted? Re-run the same command with ``--resume`` (the CMA state, RNG and history
continue exactly from the last completed generation). The result is
``<out>/best.safetensors``, loadable with ``vllm serve --namm-weights``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from evolve.config import ConfigError, EvolveConfig, load_config
from evolve.extras import require


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evolve",
        description="Evolve NAMM KV-eviction scorer weights with CMA-ES against a `vllm serve --kv-eviction namm` "
        "server (OpenAI API). Every candidate's parameters travel per request, so one server evaluates a whole "
        "generation concurrently.",
        epilog="Config reference: evolve/README.md. Example configs: evolve/configs/*.json. "
        "Precedence: config file < explicit flags < --set.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        help="JSON run config (see evolve/configs/); on --resume defaults to <out>/config.json",
    )
    p.add_argument(
        "--base-url", help="server OpenAI base URL, e.g. http://127.0.0.1:8000/v1 (server.base_url)"
    )
    p.add_argument("--model", help="served model name (server.model; default: the first one served)")
    p.add_argument(
        "--weights",
        type=Path,
        help="start weights file, the one the server loads (start_weights; default: the shipped "
        "default, vllm_namm/data/evolved_l2_tiny_llama.safetensors)",
    )
    p.add_argument("--out", type=Path, help="run directory (out_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in the run directory")
    p.add_argument("--popsize", type=int, help="CMA-ES population (cma.popsize)")
    p.add_argument("--sigma0", type=float, help="initial step size (cma.sigma0; paper 0.65, seed runs 0.065)")
    p.add_argument("--seed", type=int, help="run seed (cma.seed, >= 1)")
    p.add_argument("--samples-per-task", type=int, help="prompts per task per generation (samples_per_task)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight (server.max_concurrency)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any field by dotted path, value parsed as JSON if it parses: "
        "--set stages.0.generations=300 --set cma.options='{\"CMA_diagonal\": true}'",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


_FLAG_FIELDS = {
    "base_url": "server.base_url",
    "model": "server.model",
    "weights": "start_weights",
    "out": "out_dir",
    "popsize": "cma.popsize",
    "sigma0": "cma.sigma0",
    "seed": "cma.seed",
    "samples_per_task": "samples_per_task",
    "max_concurrency": "server.max_concurrency",
}


def resolve_config(args: argparse.Namespace) -> EvolveConfig:
    """Config file (or, on --resume, the run's saved config) + explicit flags + --set overrides."""
    overrides: list[str] = []
    for attr, dotted in _FLAG_FIELDS.items():
        v = getattr(args, attr)
        if v is not None:
            overrides.append(f"{dotted}={json.dumps(str(v) if isinstance(v, Path) else v)}")
    overrides += args.overrides
    path = args.config
    if path is None:
        if not args.resume:
            raise ConfigError("--config is required (unless --resume, which reads <out>/config.json)")
        out = args.out
        if out is None:
            raise ConfigError("--resume without --config needs --out (the run directory)")
        path = Path(out) / "config.json"
        if not path.is_file():
            raise ConfigError(f"--resume: {path} not found; pass --config")
    return load_config(path, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require("evolve", "python -m evolve")
    # Only our own logger at the chosen level: httpx logs every request at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("evolve").setLevel(getattr(logging, args.log_level))
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.model_dump_json(indent=2))
        return 0
    return asyncio.run(_run(cfg, resume=args.resume, progress=not args.no_progress))


async def _run(cfg: EvolveConfig, *, resume: bool, progress: bool) -> int:
    from evolve.client import BadSettingError, EvalClient, ServerRequestError, ServerUnreachableError
    from evolve.loop import Evolution, GenerationFailedError

    try:
        from vllm_namm.weights import WeightsError
    except ImportError:  # pragma: no cover - vllm_namm is part of this repo
        WeightsError = ValueError  # type: ignore[misc,assignment]  # noqa: N806
    async with EvalClient(cfg.server) as client:
        try:
            summary: dict[str, Any] = await Evolution(cfg, client, resume=resume, progress=progress).run()
        except (
            ConfigError,
            WeightsError,
            BadSettingError,
            ServerRequestError,
            ServerUnreachableError,
            GenerationFailedError,
        ) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

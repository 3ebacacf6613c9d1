"""Run ``vllm serve`` start-up validation for many flag sets in ONE process, without an engine.

``python tests/serve_cli_harness.py CASES.json RESULTS.json``: CASES is a JSON list of argument
lists (``["MODEL", "--kv-eviction", ...]``, as after ``vllm serve``). For each, this does what
``vllm serve`` does before an engine starts: vLLM's own ``serve`` parser (plugins loaded, so our
flags are in it), ``AsyncEngineArgs.from_cli_args`` and ``create_engine_config``, with the plugin
believing it runs inside the ``vllm`` command (one ``vllm-namm: error:`` line and exit 2).
A case that passes stops after the engine config is built (no model is loaded).

RESULTS gets, per case: ``rc`` (the SystemExit code, 0 when the config was built), ``stderr``
(what the case wrote to stderr, with the traceback of any other exception) and, when it
passed, the scheduler's ``long_prefill_token_threshold``, ``max_model_len`` and the eviction
interval. Importing vLLM costs ~20 s; each case then takes milliseconds, so the sweep test runs
its whole table here and confirms a few cases with real ``vllm serve`` runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from typing import Any


def main(cases_path: str, results_path: str) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    load_general_plugins()
    import vllm_namm.vllm_patch.cli as cli

    cli._is_cli = lambda: True  # as inside the `vllm` command
    serve = ServeSubcommand()
    parser = FlexibleArgumentParser(prog="vllm")
    serve.subparser_init(parser.add_subparsers(dest="subparser"))

    results: list[dict[str, Any]] = []
    for argv in json.loads(open(cases_path).read()):
        err = io.StringIO()
        out: dict[str, Any] = {"argv": argv, "rc": 0}
        with contextlib.redirect_stderr(err):
            try:
                args = parser.parse_args(["serve", *argv])
                args.model = args.model_tag
                serve.validate(args)
                config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
                namm = (config.additional_config or {}).get("namm") or {}
                out |= {
                    "long_prefill_token_threshold": config.scheduler_config.long_prefill_token_threshold,
                    "max_model_len": config.model_config.max_model_len,
                    "interval": namm.get("interval"),
                }
            except SystemExit as e:
                out["rc"] = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
                traceback.print_exc(file=err)
                out["rc"] = -1
        out["stderr"] = err.getvalue()
        results.append(out)
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

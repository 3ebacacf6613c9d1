"""API-server side: per-request settings validation (-> HTTP 400) and ``/metrics``.

Both hooks run in the API-server process: ``InputProcessor._validate_params`` sees every
request's ``SamplingParams`` before it reaches the engine, and
``OutputProcessor.process_outputs`` sees every finished request's eviction summary (which
the scheduler returns in ``kv_transfer_params[SUMMARY_KEY]``).
"""

from __future__ import annotations

from typing import Any

from vllm_namm.config import EvictionConfig
from vllm_namm.vllm_patch.engine_config import SUMMARY_KEY, eviction_config
from vllm_namm.vllm_patch.patching import patch
from vllm_namm.vllm_patch.policy_book import PolicyBook
from vllm_namm.vllm_patch.request_settings import (
    RequestSettingsError,
    parse_request_settings,
    validate_for_server,
)


class _Metrics:
    """Prometheus series, created lazily in the process that serves ``/metrics``."""

    def __init__(self) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        # One set of series per process: an earlier output processor's (another engine in this
        # process, as in tests) is replaced, as vLLM does with its own (unregister_vllm_metrics).
        for collector in list(REGISTRY._collector_to_names):
            if getattr(collector, "_name", "").startswith("vllm_namm:"):
                REGISTRY.unregister(collector)

        self.requests = Counter("vllm_namm:evicting_requests", "Finished requests that had KV pages evicted")
        self.evicted = Counter("vllm_namm:evicted_blocks", "KV blocks freed by eviction before request end")
        self.requested = Counter(
            "vllm_namm:token_evictions_requested", "(layer, head, token) evictions the policy asked for"
        )
        self.realised = Counter(
            "vllm_namm:token_evictions_realised", "Token-level evictions realised by freeing whole pages"
        )
        self.retained = Histogram(
            "vllm_namm:retained_fraction",
            "Fraction of a request's KV blocks still held when it finished",
            buckets=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
        )
        self.budget_tokens = Counter(
            "vllm_namm:budget_tokens",
            "Budgets (tokens) of finished budget-policy requests, at their final context",
        )
        self.budget_blocks = Counter(
            "vllm_namm:budget_blocks",
            "Budgets of finished budget-policy requests, in KV blocks (ceil(budget / block size))",
        )
        self.held_blocks = Counter(
            "vllm_namm:held_blocks", "KV blocks finished evicting requests held at the end"
        )
        self.held = Gauge(
            "vllm_namm:blocks_held_by_evicting_requests",
            "KV blocks held by running requests that evict (sampled at each request finish)",
        )
        self.prefix_hits = Counter(
            "vllm_namm:prefix_snapshot_hits",
            "Finished evicting requests that resumed from a step snapshot (eviction-aware prefix caching)",
        )
        self.prefix_tokens = Counter(
            "vllm_namm:prefix_snapshot_tokens_saved",
            "Prompt tokens evicting requests took from step snapshots instead of prefilling them",
        )
        self.prefix_records = Gauge(
            "vllm_namm:prefix_snapshots", "Step snapshots held (sampled at each evicting request's finish)"
        )
        self.prefix_bytes = Gauge(
            "vllm_namm:prefix_snapshot_bytes",
            "Bytes of policy state the step snapshots hold per worker (sampled at each evicting request's finish)",
        )

    def observe(self, s: dict[str, Any]) -> None:
        self.requests.inc()
        self.evicted.inc(s.get("evicted_blocks", 0))
        self.requested.inc(s.get("token_evictions_requested", 0))
        self.realised.inc(s.get("token_evictions_realised", 0))
        self.retained.observe(float(s.get("retained_fraction", 1.0)))
        self.held.set(s.get("blocks_held_by_evicting_requests", 0))
        self.held_blocks.inc(s.get("held_blocks", 0))
        self.budget_tokens.inc(s.get("budget_tokens", 0))
        self.budget_blocks.inc(s.get("budget_blocks", 0))
        saved = s.get("prefix_restored_tokens", 0)
        if saved:
            self.prefix_hits.inc()
            self.prefix_tokens.inc(saved)
        if "prefix_records" in s:
            self.prefix_records.set(s["prefix_records"])
            self.prefix_bytes.set(s.get("prefix_record_bytes", 0))


def _book(processor: Any) -> PolicyBook:
    """The API server's policies (built on first use, kept on its input processor)."""
    book = getattr(processor, "_namm_book", None)
    if book is None:
        book = processor._namm_book = PolicyBook(eviction_config(processor.vllm_config) or EvictionConfig())
    return book


def install() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    @patch(InputProcessor, "_validate_params")
    def _validate_params(original, self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None)
        if extra:
            try:
                settings = parse_request_settings(extra)
                if not settings.is_default:
                    book = _book(self)
                    validate_for_server(settings, book.server, lambda cfg: book.policy(settings).num_params)
            except RequestSettingsError as e:
                raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        return result

    @patch(OutputProcessor, "process_outputs")
    def process_outputs(original, self, engine_core_outputs, *args, **kwargs):
        for out in engine_core_outputs:
            params = getattr(out, "kv_transfer_params", None)
            if out.finish_reason is not None and params and SUMMARY_KEY in params:
                metrics = getattr(self, "_namm_metrics", None)
                if metrics is None:
                    metrics = self._namm_metrics = _Metrics()
                metrics.observe(params[SUMMARY_KEY])
        return original(self, engine_core_outputs, *args, **kwargs)

"""The policies one process builds: the server's, and those its requests ask for, each built once.

Every process that needs a policy owns one book (the worker's runner, the scheduler, the API
server): a request's ``vllm_xargs`` are applied to the server's config once per distinct setting,
and the weights files are read through the book's one :class:`~vllm_namm.weights.WeightsStore`.
"""

from __future__ import annotations

from vllm_namm.config import EvictionConfig
from vllm_namm.policies.base import EvictionPolicy
from vllm_namm.policies.registry import make_policy
from vllm_namm.vllm_patch.request_settings import RequestSettings
from vllm_namm.weights import WeightsStore

MAX_ENTRIES = 64
"""Distinct request settings remembered (evolution sends a new threshold per candidate)."""


class PolicyBook:
    """The server's config and policy, and each request setting's (built on first use)."""

    def __init__(self, server: EvictionConfig) -> None:
        self.server = server
        self.weights = WeightsStore()
        self._default: EvictionPolicy | None = None
        self._configs: dict[str, EvictionConfig] = {}
        self._policies: dict[str, EvictionPolicy] = {}

    @property
    def default(self) -> EvictionPolicy:
        """The server's own policy."""
        if self._default is None:
            self._default = make_policy(self.server, self.weights)
        return self._default

    def config(self, settings: RequestSettings) -> EvictionConfig:
        """The config a request runs: the server's with its overrides (raises ``ValueError``)."""
        if not settings.overrides_config:
            return self.server
        key = settings.cache_key()
        if key not in self._configs:
            if len(self._configs) >= MAX_ENTRIES:
                self._configs.clear()
            self._configs[key] = settings.apply(self.server)
        return self._configs[key]

    def policy(self, settings: RequestSettings) -> EvictionPolicy:
        """The request's policy. Per-request-only knobs (a candidate's ``namm_params``) make no new
        policy: they go into the request's states (:meth:`RequestSettings.state_options`)."""
        if not settings.overrides_config:
            return self.default
        key = settings.cache_key()
        if key not in self._policies:
            if len(self._policies) >= MAX_ENTRIES:
                self._policies.clear()
            self._policies[key] = make_policy(self.config(settings), self.weights)
        return self._policies[key]

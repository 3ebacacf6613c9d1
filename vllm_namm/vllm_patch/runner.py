"""Model-runner patches of paged eviction (vLLM 0.32 V1 runner: GPUModelRunner and CPUModelRunner).

Five wrappers, dormant unless a runner enables eviction (``runner._namm``, a
:class:`~vllm_namm.vllm_patch.runner_state.NammRunnerState`, made when the KV cache is initialised
with eviction on):

* ``initialize_kv_cache``: makes the state;
* ``execute_model``: the state's bookkeeping before the forward pass, its step after it, and the
  step's eviction reports on the output (:mod:`.channel`);
* ``sample_tokens``: reports on that output too (vLLM returns either);
* ``_build_attention_metadata`` and ``AttentionGroup.build_metadata``: the rows with holes are
  compacted (:mod:`.holes`) in the metadata every attention group of an evicted KV-cache group
  builds for the step (each KV-cache group with its own holes).
"""

from __future__ import annotations

from vllm_namm.vllm_patch.engine_config import eviction_config
from vllm_namm.vllm_patch.holes import compact_metadata, compacting, compaction_of
from vllm_namm.vllm_patch.patching import patch
from vllm_namm.vllm_patch.runner_state import NammRunnerState


def install() -> None:
    """Wrap the runner and AttentionGroup methods (dormant unless a runner enables eviction)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import AttentionGroup

    @patch(GPUModelRunner, "initialize_kv_cache")
    def initialize_kv_cache(original, self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        cfg = eviction_config(self.vllm_config)
        if cfg is not None and not kwargs.get("is_profiling", False):
            self._namm = NammRunnerState(self, cfg)
        return result

    @patch(GPUModelRunner, "execute_model")
    def execute_model(original, self, scheduler_output, *args, **kwargs):
        namm: NammRunnerState | None = getattr(self, "_namm", None)
        if namm is None:
            return original(self, scheduler_output, *args, **kwargs)
        namm.before_step(scheduler_output)
        result = original(self, scheduler_output, *args, **kwargs)
        namm.after_forward(scheduler_output)
        return namm.outbox.attach(result)

    @patch(GPUModelRunner, "sample_tokens")
    def sample_tokens(original, self, *args, **kwargs):
        namm: NammRunnerState | None = getattr(self, "_namm", None)
        result = original(self, *args, **kwargs)
        return result if namm is None else namm.outbox.attach(result)

    @patch(GPUModelRunner, "_build_attention_metadata")
    def _build_attention_metadata(original, self, *args, **kwargs):
        namm: NammRunnerState | None = getattr(self, "_namm", None)
        if namm is None or kwargs.get("for_cudagraph_capture"):
            return original(self, *args, **kwargs)
        with compacting(self.attn_groups, namm.compaction()):
            return original(self, *args, **kwargs)

    @patch(AttentionGroup, "build_metadata")
    def build_metadata(original, self, common_attn_metadata, *args, **kwargs):
        compaction = compaction_of(self)
        if compaction is not None:
            common_attn_metadata = compaction.apply(common_attn_metadata)
        return original(self, common_attn_metadata, *args, **kwargs)


__all__ = ["NammRunnerState", "compact_metadata", "install"]

"""The KV block size when eviction is on: eviction pages are vLLM's blocks, so the smaller the better.

vLLM-CPU picks 128-token blocks unless told (a speed default of its platform, not a limit of its
attention kernel, which takes any multiple of 32). Evicting whole 128-token pages throws away
good tokens with bad ones: on held-out real text at 0.25 retained, H2O went from 0.38 at block 128
to 0.63 at block 32, SnapKV from 0.44 to 0.56 (issue 26). So when eviction is on and the user has
not set ``--block-size``, the block is the smallest the attention backend supports; a user's
explicit ``--block-size`` wins, with a warning above :data:`LARGEST_GOOD_BLOCK`.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.namm")

CPU_BLOCK = 32
"""The smallest block vLLM's CPU attention kernel supports (multiples of 32)."""
GPU_BLOCK = 16
"""vLLM's default on GPU, FlashAttention's smallest page (a backend needing more still raises it,
as vLLM does for any default)."""
LARGEST_GOOD_BLOCK = 32
"""Above this, pages are coarse enough to cost accuracy (issue 26's block-128 column)."""


def choose_block_size(args: Any, on_cpu: bool) -> None:
    """Set ``args.block_size`` when eviction is on and the user left it unset; log the choice.

    ``args`` is vLLM's ``EngineArgs`` (``block_size`` None unless ``--block-size`` or
    ``LLM(block_size=...)`` set it). Called only when eviction is on.
    """
    asked = getattr(args, "block_size", None)
    if asked is None:
        platform = "cpu" if on_cpu else "gpu"
        args.block_size = CPU_BLOCK if on_cpu else GPU_BLOCK
        logger.info(
            "vllm-namm: KV block size %d (eviction frees whole blocks: the smallest the %s attention "
            "backend supports; vLLM's own default%s; --block-size overrides)",
            args.block_size,
            platform.upper(),
            " is 128 on CPU" if on_cpu else " is the same",
        )
    elif asked > LARGEST_GOOD_BLOCK:
        logger.warning(
            "vllm-namm: --block-size %d: eviction frees whole %d-token pages, which keeps fewer good "
            "tokens at the same budget than blocks of %d or less (e.g. H2O at 0.25 retained: 0.38 "
            "accuracy at block 128 against 0.63 at block 32 on real text)",
            asked,
            asked,
            LARGEST_GOOD_BLOCK,
        )

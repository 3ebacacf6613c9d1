"""Run namm_kernels under the Triton interpreter when there is no CUDA device.

Imported first by ``conftest.py``: Triton decides at decoration time whether a ``@triton.jit``
function is interpreted, its own library functions included, so ``TRITON_INTERPRET`` must be
set before Triton is imported. Once Triton's knob holds the setting for this process, the
variable leaves the environment again, so the ``vllm serve`` processes the tests start behave
as they do for users.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language  # noqa: F401 - its @jit library functions are decorated now

    triton.knobs.runtime.interpret = True
    del os.environ["TRITON_INTERPRET"]
    for _name in ("namm_kernels.paged_attention_columns", "namm_kernels.spectrogram_ema", "namm_kernels"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

"""Run namm_kernels under the Triton interpreter when there is no CUDA device.

Imported by the kernel test modules before they import ``namm_kernels``: the environment
variable must be set before kernels are decorated, and modules decorated earlier in this
pytest process without it are reloaded.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("namm_kernels.paged_attention_columns", "namm_kernels.spectrogram_ema", "namm_kernels"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

"""gptfast: GPT-2 training and sampling with hand-written Triton kernels.

The backend switch lives in ``kernels.backend`` and is re-exported here.
"""

from kernels.backend import BACKENDS, BackendError, explain, get_backend, set_backend, use_backend

from .model import GPT, PRESETS, GPTConfig

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendError", "explain", "get_backend", "set_backend", "use_backend",
    "GPT", "GPTConfig", "PRESETS", "__version__",
]

"""gptfast: GPT-2 training and sampling with hand-written Triton kernels.

The backend switch lives in ``kernels.backend`` and is re-exported here.
"""

from .generation import generate, stream
from .kernels.backend import BACKENDS, BackendError, explain, get_backend, set_backend, use_backend
from .model import GPT, PRESETS, GPTConfig, KVCache
from .patch import patch
from .pretrained import from_pretrained, save_pretrained  # also GPT.from_pretrained, model.save_pretrained
from .tokenizer import CharTokenizer, GPT2Tokenizer, load_tokenizer
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendError", "explain", "get_backend", "set_backend", "use_backend",
    "GPT", "GPTConfig", "KVCache", "PRESETS", "generate", "stream", "patch", "__version__",
    "from_pretrained", "save_pretrained",
    "CharTokenizer", "GPT2Tokenizer", "load_tokenizer", "TrainConfig", "train",
]

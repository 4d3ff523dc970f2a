"""``python -m gptfast.lab ...``: the kernel lab; kernels run under the interpreter without a GPU."""

import os
import sys

import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .cli import main  # noqa: E402

sys.exit(main())

"""Benchmarks of the kernels and of GPT-2 training and generation, against eager PyTorch,
``torch.compile``, PyTorch's flash attention and Liger-Kernel.

``python -m gptfast.bench`` (or ``gptfast bench``) writes the full report; ``pytest --benchmark`` runs the
same measurements through pytest-benchmark. See the README's "Benchmarks" section.
"""

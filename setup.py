from setuptools import setup

setup(
    # "gptfast" on PyPI is an unrelated project. Everything installs under the one import package
    # gptfast: the repository's kernels/ and bench/ folders become gptfast.kernels and gptfast.bench,
    # so no top-level module collides with another distribution's (PyPI has "kernels" and "bench").
    name="gptfast-triton",
    version="0.1.0",
    description="GPT-2 training and sampling made fast with hand-written Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["gptfast", "gptfast.kernels", "gptfast.bench", "gptfast.lab"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels", "gptfast.bench": "bench"},
    package_data={"gptfast.kernels": ["configs/*.json"]},  # the flash-attention block-size tables
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tiktoken",
        "tqdm",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # The CPU tests run the kernels in Triton's interpreter, which needs 3.7 or newer (3.6's cannot
        # take loop bounds computed from program ids); compiled GPU kernels work with 3.0 and newer.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "transformers", "safetensors", "ruff",
                 "triton>=3.7; platform_system == 'Linux'"],
        "bench": ["matplotlib"],
        # GPT.from_pretrained / save_pretrained; huggingface_hub downloads gpt2, gpt2-medium, ...
        "pretrained": ["safetensors", "huggingface_hub"],
    },
    entry_points={"console_scripts": ["gptfast = gptfast.cli:main"]},
)

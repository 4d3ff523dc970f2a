from setuptools import find_packages, setup

setup(
    # "gptfast" on PyPI is an unrelated project. Everything installs under the one import package
    # gptfast, kept under src/ (the src layout): the checkout's root holds nothing importable, so a
    # process started there finds installed distributions, such as Hugging Face's "kernels", and not
    # folders of ours. The kernels are src/gptfast/kernels/, the benchmarks src/gptfast/bench/.
    name="gptfast-triton",
    version="0.1.0",
    description="GPT-2 training and sampling made fast with hand-written Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"gptfast.kernels": ["configs/*.json"]},  # the flash-attention block-size tables
    # Ranges, as a library's should be; constraints.txt pins the versions the tests ran with.
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
        # gptfast prepare's record files: .parquet and .arrow (pyarrow), .jsonl.zst (zstandard)
        "data": ["pyarrow", "zstandard"],
    },
    entry_points={"console_scripts": ["gptfast = gptfast.cli:main"]},
)

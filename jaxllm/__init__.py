"""jaxllm: pretraining, SFT, LoRA and DPO of decoder-only language models in JAX."""

__version__ = "0.1.0"

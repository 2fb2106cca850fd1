"""jaxllm: pretraining, SFT, LoRA and DPO of decoder-only language models in JAX."""

import os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimized scheduler is off unless XLA_FLAGS sets it: on a 2-core CPU the tiny and small
# presets' steps (layers in a Python loop) run 5-12% faster without it (bench/RESULTS.md, #19). XLA reads its
# flags when the backend starts, so this holds wherever jaxllm is imported before the first computation. It names
# an XLA:CPU option only: GPU compiles do not read it.
_CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _CPU_SCHEDULER not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER}=false".strip()

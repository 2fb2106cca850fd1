"""jaxllm: pretraining, SFT, LoRA and DPO of decoder-only language models in JAX."""

import ctypes
import ctypes.util
import os
import sys

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimized scheduler is off unless XLA_FLAGS sets it: on a 2-core CPU the tiny and small
# presets' steps (layers in a Python loop) run 5-12% faster without it (bench/RESULTS.md, #19). XLA reads its
# flags when the backend starts, so this holds wherever jaxllm is imported before the first computation. It names
# an XLA:CPU option only: GPU compiles do not read it.
_CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _CPU_SCHEDULER not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER}=false".strip()


def _keep_freed_memory() -> bool:
  """glibc keeps freed memory for reuse instead of returning it to the system. XLA:CPU allocates each step's
  temporaries as one block (147 MB for the tiny preset's train step), which glibc would map fresh and unmap after
  every step, so each step page-faulted all of it again: ~36,000 faults and a third of the step's CPU time
  (bench/RESULTS.md, #19). With one arena, no mmap'd chunks and trimming only above 2 GiB, the block is reused.
  The process's resident memory then stays at its peak. Off with JAXLLM_MALLOC=system, or when the environment
  already tunes glibc's malloc (GLIBC_TUNABLES, MALLOC_*_). Returns whether it applied."""
  if os.environ.get("JAXLLM_MALLOC", "keep") == "system" or not sys.platform.startswith("linux"):
    return False
  if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
    return False
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return all(mallopt(option, value) == 1
             for option, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


MALLOC_TUNED = _keep_freed_memory()

"""jaxllm: pretraining, SFT, LoRA and DPO of decoder-only language models in JAX."""

import os
import platform
import sys

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimized scheduler is off unless XLA_FLAGS sets it: on a 2-core CPU the tiny and small
# presets' steps (layers in a Python loop) run 5-12% faster without it (bench/RESULTS.md, #19). XLA reads its
# flags when the backend starts, so this holds wherever jaxllm is imported before the first computation. It names
# an XLA:CPU option only: GPU compiles do not read it.
_CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _CPU_SCHEDULER not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER}=false".strip()

HUGEPAGES = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def relaunch_with_hugepages() -> None:
  """Runs this process again (os.execv: the same interpreter, arguments and pid) with GLIBC_TUNABLES=HUGEPAGES,
  under which glibc's malloc asks for transparent huge pages for its large blocks.

  Why: XLA:CPU allocates each step's temporaries as one block (147 MB for the tiny preset's train step), which
  glibc maps fresh and unmaps after every step; in 4 KiB pages every step faulted all of it in again: ~36,000
  faults, a third of the tiny step's CPU time (bench/RESULTS.md, #19). In 2 MiB pages it is a few hundred. glibc
  reads its tunables only when a process starts, hence the relaunch.

  Does nothing where GLIBC_TUNABLES is already set (by the user, or by this relaunch), JAXLLM_MALLOC=system, the
  C library is not glibc >= 2.35, or the kernel's transparent huge pages are off. The `jaxllm` command and
  `python -m jaxllm.<command>` call it before anything else is imported; call it from a script's main block."""
  if "GLIBC_TUNABLES" in os.environ or os.environ.get("JAXLLM_MALLOC") == "system":
    return
  lib, version = platform.libc_ver()
  if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
    return
  try:
    with open(_THP) as f:
      if "[never]" in f.read():
        return
  except OSError:
    return
  os.environ["GLIBC_TUNABLES"] = HUGEPAGES
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _is_command(argv: list) -> bool:
  """Whether the process was started as a jaxllm command: `jaxllm ...` or `python -m jaxllm.<module> ...`."""
  rest = list(argv[1:])
  while rest and rest[0].startswith("-"):  # the interpreter's options, up to -m MODULE or the script
    option = rest.pop(0)
    if option == "-m":
      return bool(rest) and rest[0].startswith("jaxllm.")
    if option in ("-X", "-W") and rest:
      rest.pop(0)
  return bool(rest) and os.path.basename(rest[0]) == "jaxllm"


if _is_command(sys.orig_argv):
  relaunch_with_hugepages()

"""Every package the code imports is declared in setup.py, with an upper bound, and pinned in constraints.txt."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# imported only inside the functions of optional extras ([hf], [tokenizers]), by jaxllm/lm_eval_adapter.py ([eval]) or tests; not
# install requirements
OPTIONAL = {"torch", "transformers", "peft", "safetensors", "pytest", "lm_eval", "tokenizers", "jinja2"}


def _imports(directory: str) -> set[str]:
  names = set()
  for base, _, files in os.walk(os.path.join(ROOT, directory)):
    for f in files:
      if f.endswith(".py"):
        for node in ast.walk(ast.parse(open(os.path.join(base, f)).read())):
          if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
          elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
  return names - set(sys.stdlib_module_names) - {"jaxllm", "configs", "experiments", "tests"} - OPTIONAL


def _name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_imports_are_declared_bounded_and_pinned():
  declared = {_name(r): r for r in importlib.metadata.requires("jaxllm") if "extra ==" not in r}
  pinned = {_name(line): line for line in open(os.path.join(ROOT, "constraints.txt"))
            if line.strip() and not line.startswith("#")}
  distributions = importlib.metadata.packages_distributions()
  for module in sorted(_imports("jaxllm") | _imports("configs") | _imports("experiments")):
    dists = {_name(d) for d in distributions.get(module, [])}
    assert dists & set(declared), f"{module} is imported but none of {dists or '{?}'} is in setup.py"
    for dist in dists & set(declared):
      assert "<" in declared[dist], f"{declared[dist]}: no upper bound"
      assert dist in pinned, f"{dist} is not pinned in constraints.txt"


def test_import_turns_the_cpu_scheduler_flag_off_unless_xla_flags_name_it():
  """jaxllm/__init__.py (bench/RESULTS.md, #19): the flag is appended to XLA_FLAGS, a user's own setting kept."""
  flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
  show = [sys.executable, "-c", "import os, jaxllm; print(os.environ['XLA_FLAGS'])"]
  for given, want in (("--xla_foo=1", f"--xla_foo=1 {flag}=false"), (f"{flag}=true", f"{flag}=true")):
    out = subprocess.run(show, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": given})
    assert out.stdout.strip() == want, out.stderr[-2000:]


_FAULTS = """
import resource, statistics, jaxllm, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(jnp.exp(x), axis=0)[::-1].sum(axis=1) + jnp.cumsum(jnp.sin(x), axis=1).sum(axis=0))
x = jnp.ones((4096, 4096), jnp.float32)  # 64 MiB: the call's temporaries are above glibc's 32 MiB mmap ceiling
faults = []
for _ in range(15):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(jaxllm.MALLOC_TUNED, statistics.median(faults[6:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_import_keeps_freed_memory_so_repeated_calls_stop_page_faulting():
  """jaxllm/__init__.py (bench/RESULTS.md, #19): XLA:CPU's per-call temporaries (64 MiB here) are reused, not
  mapped and faulted in again on every call; JAXLLM_MALLOC=system or a user's own GLIBC_TUNABLES keep glibc's
  defaults, under which every call faults its temporaries in (the reference: 4 KiB pages, >= 16,384 per call)."""
  def run(**env):
    out = subprocess.run([sys.executable, "-c", _FAULTS], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    tuned, faults = out.stdout.split()
    return tuned == "True", float(faults)
  tuned, faults = run()
  if not tuned:
    pytest.skip("not glibc: nothing to tune")
  assert faults < 1000
  assert run(JAXLLM_MALLOC="system") == (False, pytest.approx(65536, rel=0.05))
  assert run(GLIBC_TUNABLES="glibc.malloc.check=0")[0] is False

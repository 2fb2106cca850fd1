"""Every package the code imports is declared in setup.py, with an upper bound, and pinned in constraints.txt."""

import ast
import importlib.metadata
import os
import platform
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
import resource, statistics, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(jnp.exp(x), axis=0)[::-1].sum(axis=1) + jnp.cumsum(jnp.sin(x), axis=1).sum(axis=0))
x = jnp.ones((4096, 4096), jnp.float32)  # 64 MiB: the call's temporaries are mapped fresh by glibc on each call
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[4:]))
"""


def _run(code: str, **env) -> list[str]:
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **env})
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()


def test_jaxllm_commands_relaunch_with_huge_pages_for_glibc_malloc():
  """jaxllm/__init__.py (bench/RESULTS.md, #19): a jaxllm command runs again, once, under GLIBC_TUNABLES=hugetlb=1,
  where XLA:CPU's per-call temporaries (64 MiB here) fault in mostly as 2 MiB pages (~1,300 faults), not as
  65,536 pages of 4 KiB on every call; a user's own GLIBC_TUNABLES or JAXLLM_MALLOC=system keep glibc's defaults;
  other programs are left alone."""
  import jaxllm
  assert jaxllm._is_command(["python", "-m", "jaxllm.train", "--config", "c.py"])
  assert jaxllm._is_command(["python", "-u", "-X", "dev", "-m", "jaxllm.cli"])
  assert jaxllm._is_command(["/venv/bin/python", "/venv/bin/jaxllm", "train"])
  for argv in (["python", "-m", "pytest"], ["python", "bench/train_step.py"], ["python", "x.py", "-m", "jaxllm.a"],
               ["python", "-c", "import jaxllm"], ["python"]):
    assert not jaxllm._is_command(argv), argv
  relaunch = "import os, jaxllm; print(os.environ.get('GLIBC_TUNABLES'), flush=True); jaxllm.relaunch_with_hugepages()"
  lib, version = platform.libc_ver()
  thp = open(jaxllm._THP).read() if os.path.exists(jaxllm._THP) else "[never]"
  if lib != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35) or "[never]" in thp:
    assert _run(relaunch) == ["None"]  # nothing to gain: no relaunch
    pytest.skip(f"{lib} {version}, transparent huge pages {thp.strip()}")
  assert _run(relaunch) == ["None", jaxllm.HUGEPAGES]  # the same code again, now with the tunable; once
  assert _run(relaunch, JAXLLM_MALLOC="system") == ["None"]
  assert _run(relaunch, GLIBC_TUNABLES="glibc.malloc.check=0") == ["glibc.malloc.check=0"]
  assert float(_run(_FAULTS, GLIBC_TUNABLES=jaxllm.HUGEPAGES)[0]) < 65536 / 16
  if "[madvise]" in thp:  # the reference: glibc's defaults fault every 4 KiB page in on every call
    assert float(_run(_FAULTS)[0]) == pytest.approx(65536, rel=0.05)


# Of jaxllm's install requirements, those the image of this workplace's lent GPU machine holds (its package list,
# read 2026-11-17: JAX 0.11.2 with jax-cuda13, flax, optax, orbax-checkpoint, ...). That machine reaches no package
# index, so bench/gpu_wheels.sh brings the others there as wheels.
GPU_IMAGE = {"jax", "flax", "optax", "orbax-checkpoint", "sentencepiece", "matplotlib", "pyyaml", "absl-py", "numpy",
             "ml-dtypes"}


def test_the_gpu_run_has_every_install_requirement_on_a_machine_without_network():
  """bench/gpu.sh (#19 item 6) runs from the checkout with the machine's own packages and installs .whl/: each
  install requirement is on the GPU image or among the wheels bench/gpu_wheels.sh fetches, pinned."""
  script = open(os.path.join(ROOT, "bench", "gpu_wheels.sh")).read()
  wheels = {_name(n) for n in re.search(r"\nfor name in ([^;]+); do\n", script).group(1).split()}
  pinned = {_name(line) for line in open(os.path.join(ROOT, "constraints.txt")) if not line.startswith("#")}
  required = {_name(r) for r in importlib.metadata.requires("jaxllm") if "extra ==" not in r}
  assert required - GPU_IMAGE - wheels == set(), "add them to bench/gpu_wheels.sh (or to GPU_IMAGE if it has them)"
  assert wheels <= pinned


def test_gpu_sh_smoke_runs_from_the_checkout_and_copies_its_log_to_out(tmp_path):
  """bash bench/gpu.sh --smoke (CPU, tiny shapes, one row): it runs bench/gpu.py from the checkout with PYTHONPATH,
  prints the table, writes nothing to bench/RESULTS.md, and copies its log and RESULTS.md to $OUT."""
  results = os.path.join(ROOT, "bench", "RESULTS.md")
  before = open(results).read()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(OUT=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))  # python3
  out = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--rows", "pretrain"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  row = r"^\| pretrain \| tiny \| float32, none, einsum \| 4 x 128 \| [\d,]+ \|"
  assert re.search(row, out.stdout, re.M), out.stdout
  assert "not written to bench/RESULTS.md" in out.stdout and open(results).read() == before
  assert "| pretrain | tiny |" in (tmp_path / "gpu.log").read_text()
  assert (tmp_path / "RESULTS.md").read_text() == before

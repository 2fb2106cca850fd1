"""Multi-process (multi-node) start-up with jax.distributed, planned from the environment.

  JAXLLM_COORDINATOR=host:port JAXLLM_NUM_PROCESSES=N JAXLLM_PROCESS_ID=i python -m jaxllm.train ...
  srun --ntasks-per-node=K python -m jaxllm.train ...                     # SLURM: K = 1 or one per GPU
  python -m jaxllm.distributed --dry-run --config CONFIG [--nodes 4 --gpus-per-node 8 --procs-per-node 8]

`plan(env)` reads who is who: with JAXLLM_COORDINATOR set, the JAXLLM_* variables (processes per node:
JAXLLM_PROCS_PER_NODE, default 1); otherwise SLURM's (SLURM_NTASKS > 1). A node's K processes split its G GPUs:
local process i drives GPUs [i*G/K, (i+1)*G/K), or, where CUDA_VISIBLE_DEVICES shows a task only its own G/K
(srun --gpus-per-task), all it sees. G comes from JAXLLM_GPUS_PER_NODE, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE or
(one process per node) CUDA_VISIBLE_DEVICES; 0 means CPU devices. JAXLLM_LOCAL_DEVICE_IDS overrides the ids.
`initialize()` hands the plan to jax.distributed.initialize with jax's own cluster detection off, because under
SLURM that gives every process only GPU SLURM_LOCALID (jax issue #16788). sharding.make_mesh groups processes
into nodes with the plan. JAXLLM_INIT_TIMEOUT (seconds, default 300) bounds the wait for the other processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import jax

from jaxllm.errors import ConfigError

_JOINED = None  # the Plan this process joined with, for procs_per_node()


@dataclasses.dataclass(frozen=True)
class Plan:
  """One process's place in a run: what jax.distributed.initialize needs, and how processes sit on nodes."""
  num_processes: int
  process_id: int
  procs_per_node: int
  coordinator: str | None                  # None: a single process, nothing to join
  local_device_ids: tuple | None           # ids of the GPUs it drives among those it sees; None: all it sees
  gpus_per_node: int | None                # None: unknown (one process per node) or 0: CPU devices
  gpus: tuple | None = None                # the node's GPUs it drives, as CUDA_VISIBLE_DEVICES names them
  own_gpus_only: bool = False              # CUDA_VISIBLE_DEVICES shows it only its own GPUs

  @property
  def nodes(self) -> int:
    return self.num_processes // self.procs_per_node

  @property
  def node(self) -> int:
    return self.node_of(self.process_id)

  def node_of(self, process_index: int) -> int:
    """Processes fill nodes in order (block distribution): a node's processes are consecutive."""
    return process_index // self.procs_per_node

  def initialize_kwargs(self) -> dict:
    ids = None if self.local_device_ids is None else list(self.local_device_ids)
    return dict(coordinator_address=self.coordinator, num_processes=self.num_processes,
                process_id=self.process_id, local_device_ids=ids)


def _int(env, *names, default=None) -> tuple[int | None, str | None]:
  """The first of `names` set in env, as (int value, name); (default, None) if none is."""
  for name in names:
    if env.get(name, "") != "":
      try:
        return int(env[name]), name
      except ValueError:
        raise ConfigError(f"{name}={env[name]!r}: not an integer") from None
  return default, None


def _tasks_per_node(value: str, name: str) -> int:
  """SLURM's '8(x4)' or '8,8' -> 8; uneven counts ('2(x3),1') cannot be grouped into equal nodes."""
  counts = set()
  for part in value.split(","):
    m = re.fullmatch(r"(\d+)(?:\(x\d+\))?", part.strip())
    if not m:
      raise ConfigError(f"{name}={value!r}: not SLURM's tasks-per-node form, e.g. '8(x4)'")
    counts.add(int(m.group(1)))
  if len(counts) != 1:
    raise ConfigError(f"{name}={value!r}: nodes run different numbers of tasks; use --ntasks-per-node so every "
                      "node runs the same number")
  return counts.pop()


def _gpus_per_node(env) -> tuple[int | None, str | None]:
  value, name = _int(env, "JAXLLM_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE")
  if name is None and env.get("SLURM_GPUS_PER_NODE"):  # '8' or 'h100:8'
    raw = env["SLURM_GPUS_PER_NODE"]
    if not (m := re.fullmatch(r"(?:[\w.-]+:)*(\d+)", raw.split(",")[0])):
      raise ConfigError(f"SLURM_GPUS_PER_NODE={raw!r}: no GPU count in it; set JAXLLM_GPUS_PER_NODE")
    value, name = int(m.group(1)), "SLURM_GPUS_PER_NODE"
  return value, name


def _visible(env) -> list[str] | None:
  """CUDA_VISIBLE_DEVICES as a list (None: unset, so every GPU of the node is visible)."""
  if "CUDA_VISIBLE_DEVICES" not in env:
    return None
  value = env["CUDA_VISIBLE_DEVICES"].strip()
  return [] if value in ("", "NoDevFiles") else [v.strip() for v in value.split(",")]


def first_host(nodelist: str) -> str:
  """The first host of a SLURM host list: 'gpu[003-004,9],cpu1' -> 'gpu003', 'r[1-2]-n[07-08]' -> 'r1-n07'."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += (ch == "[") - (ch == "]")
    if ch == "," and depth == 0:
      end = i
      break
  return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def _slurm_coordinator(env) -> str:
  """Host 0 of the step (where process 0 runs) and jax's SLURM port: JAX_COORDINATOR_PORT, else one from the job
  id in the ephemeral range, so that two jobs sharing a node do not collide."""
  nodelist = next((env[n] for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)),
                  None)
  if nodelist is None:
    raise ConfigError("SLURM_STEP_NODELIST: not set, so the coordinator (process 0's node) is unknown; set "
                      "JAXLLM_COORDINATOR=host:port (with JAXLLM_NUM_PROCESSES and JAXLLM_PROCESS_ID)")
  port = env.get("JAX_COORDINATOR_PORT") or str(int(env.get("SLURM_JOB_ID", "0")) % 2**12 + 65535 - 2**12 + 1)
  return f"{first_host(nodelist)}:{port}"


def _procs_per_node(env, num_processes: int) -> tuple[int, str]:
  """SLURM: (processes per node, where it came from); checks the node count agrees."""
  nodes, nodes_name = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
  k, k_name = _int(env, "JAXLLM_PROCS_PER_NODE")
  k_name = k_name and f"{k_name}={k}"
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if env.get(name):
      slurm_k = _tasks_per_node(env[name], name)
      if k is not None and k != slurm_k:
        raise ConfigError(f"{k_name} disagrees with {name}={env[name]!r}; unset one")
      k, k_name = slurm_k, f"{name}={env[name]!r}"
      break
  if k is None:
    if nodes is None or num_processes % nodes:
      raise ConfigError(f"SLURM_NTASKS={num_processes}: cannot tell how many run on each node "
                        f"({nodes_name or 'SLURM_NNODES'}={nodes}); set JAXLLM_PROCS_PER_NODE")
    return num_processes // nodes, f"SLURM_NTASKS={num_processes} / {nodes_name}={nodes}"
  if nodes is not None and nodes * k != num_processes:
    raise ConfigError(f"SLURM_NTASKS={num_processes} is not {nodes_name}={nodes} nodes x {k} processes per node "
                      f"({k_name}); every node must run the same number of processes")
  return k, k_name


def plan(env) -> Plan:
  """This process's Plan from the environment (a mapping; os.environ in a run). Raises ConfigError naming the
  variables that disagree."""
  if "JAXLLM_COORDINATOR" in env:
    n, _ = _int(env, "JAXLLM_NUM_PROCESSES")
    pid, _ = _int(env, "JAXLLM_PROCESS_ID")
    if n is None or pid is None:
      raise ConfigError("JAXLLM_COORDINATOR is set: JAXLLM_NUM_PROCESSES and JAXLLM_PROCESS_ID must be too")
    k, _ = _int(env, "JAXLLM_PROCS_PER_NODE", default=1)
    k_name = f"JAXLLM_PROCS_PER_NODE={k}"
    if k < 1 or n % k:
      raise ConfigError(f"JAXLLM_PROCS_PER_NODE={k} does not divide JAXLLM_NUM_PROCESSES={n}")
    coordinator, local = env["JAXLLM_COORDINATOR"], pid % k
  else:
    n, _ = _int(env, "SLURM_NTASKS", "SLURM_NPROCS", default=1)
    pid, _ = _int(env, "SLURM_PROCID", default=0)
    k, k_name = _procs_per_node(env, n) if n > 1 else (1, "a single process")
    local, _ = _int(env, "SLURM_LOCALID", default=pid % k)
    if local != pid % k:
      raise ConfigError(f"SLURM_LOCALID={local} is not SLURM_PROCID={pid} mod {k} processes per node ({k_name}): "
                        "a node's processes must be consecutive; run srun with --distribution=block")
    coordinator = _slurm_coordinator(env) if n > 1 else None
  if not 0 <= pid < n:
    raise ConfigError(f"process id {pid} is not in [0, {n}) processes")
  g, g_name = _gpus_per_node(env)
  visible = _visible(env)
  if g is None and visible is not None and k == 1:
    g, g_name = len(visible), "CUDA_VISIBLE_DEVICES"
  if coordinator is None:  # a single process drives whatever it sees (e.g. CUDA_VISIBLE_DEVICES=0 for one GPU)
    gpus = tuple(visible) if visible is not None else tuple(map(str, range(g))) if g else None
    return Plan(num_processes=1, process_id=0, procs_per_node=1, coordinator=None, local_device_ids=None,
                gpus_per_node=g, gpus=gpus)
  if g is None and k > 1:
    raise ConfigError(f"{k} processes per node ({k_name}) but the GPUs per node are unknown: set "
                      "JAXLLM_GPUS_PER_NODE (0 for CPU devices) or request GPUs with --gpus-per-node")
  ids, gpus, own = _local_ids(env, g, g_name, k, k_name, local, visible)
  return Plan(num_processes=n, process_id=pid, procs_per_node=k, coordinator=coordinator, local_device_ids=ids,
              gpus_per_node=g, gpus=gpus, own_gpus_only=own)


def _local_ids(env, g, g_name, k, k_name, local, visible):
  """(local_device_ids, the node's GPUs they are, whether CUDA_VISIBLE_DEVICES shows only this process's)."""
  if env.get("JAXLLM_LOCAL_DEVICE_IDS"):
    ids = tuple(int(i) for i in env["JAXLLM_LOCAL_DEVICE_IDS"].split(","))
    return ids, tuple(visible[i] if visible and i < len(visible) else str(i) for i in ids), False
  if not g:
    return None, None, False
  if g % k:
    raise ConfigError(f"{g_name}={g} GPUs per node do not split evenly over {k} processes per node ({k_name}); "
                      "use a number of processes per node that divides the GPUs")
  per = g // k
  mine = range(local * per, (local + 1) * per)
  if visible is None or len(visible) == g:  # every task sees the node's GPUs: take its share
    return tuple(mine), tuple(visible[i] if visible else str(i) for i in mine), False
  if len(visible) == per:  # cgroups / --gpus-per-task: it sees only its own, numbered from 0
    return tuple(range(per)), tuple(visible), k > 1
  raise ConfigError(f"CUDA_VISIBLE_DEVICES={','.join(visible)!r} shows {len(visible)} GPUs: neither the node's {g} "
                    f"({g_name}) nor this process's {per} ({g} / {k} processes per node, {k_name}); set "
                    "JAXLLM_GPUS_PER_NODE or JAXLLM_LOCAL_DEVICE_IDS")


def initialize(env=None) -> bool:
  """Joins the processes of a multi-process run; a no-op for a single process. Returns whether it joined."""
  global _JOINED
  env = os.environ if env is None else env
  p = plan(env)
  if p.coordinator is None:
    return False
  # CPU processes (tests, laptops) need a collectives backend; GPUs use NCCL regardless of this flag.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**p.initialize_kwargs(), cluster_detection_method="deactivate",
                             initialization_timeout=int(env.get("JAXLLM_INIT_TIMEOUT", "300")))
  _JOINED = p
  return True


def procs_per_node() -> int:
  """Processes per node of the run this process joined (1 if it joined none: each process its own node)."""
  return _JOINED.procs_per_node if _JOINED else 1


# --dry-run: the plan of every process and the mesh they would build, from fake devices; jax.distributed is never
# called, so it runs on a laptop or as the first step of a SLURM job.

def simulated_env(nodes: int, gpus_per_node: int, procs_per_node: int, process_id: int, *, gpus_per_task=False,
                  job_id: int = 4242) -> dict:
  """The SLURM variables srun gives process `process_id` of nodes x procs_per_node tasks (block distribution);
  gpus_per_task: each task's CUDA_VISIBLE_DEVICES lists only its own GPUs (--gpus-per-task)."""
  k, n = procs_per_node, nodes * procs_per_node
  local, per = process_id % k, gpus_per_node // k
  visible = range(local * per, (local + 1) * per) if gpus_per_task else range(gpus_per_node)
  return {"SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": str(n), "SLURM_PROCID": str(process_id),
          "SLURM_LOCALID": str(local), "SLURM_NODEID": str(process_id // k), "SLURM_STEP_NUM_NODES": str(nodes),
          "SLURM_STEP_NODELIST": f"node[001-{nodes:03d}]" if nodes > 1 else "node001",
          "SLURM_STEP_TASKS_PER_NODE": f"{k}(x{nodes})" if nodes > 1 else str(k),
          "SLURM_GPUS_ON_NODE": str(gpus_per_node), "CUDA_VISIBLE_DEVICES": ",".join(map(str, visible))}


def sibling_env(env, p: Plan, process_id: int) -> dict:
  """The environment another process of this run would see, as this one's implies (block distribution)."""
  k, local = p.procs_per_node, process_id % p.procs_per_node
  out = dict(env)
  for name, value in (("JAXLLM_PROCESS_ID", process_id), ("SLURM_PROCID", process_id), ("SLURM_LOCALID", local),
                      ("SLURM_NODEID", process_id // k)):
    if name in env:
      out[name] = str(value)
  if p.own_gpus_only:
    per = p.gpus_per_node // k
    out["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(local * per, (local + 1) * per))
  return out


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What sharding.layout reads of a device, plus where it sits."""
  id: int
  process_index: int
  node: int
  gpu: str
  platform: str = "gpu"
  device_kind: str = "dry-run GPU"

  def __repr__(self):
    return f"n{self.node}:g{self.gpu}"


def fake_devices(plans: list[Plan]) -> list[FakeDevice]:
  """Every process's GPUs as devices, numbered process by process as jax numbers GPUs."""
  devices = []
  for p in plans:
    for gpu in p.gpus:
      devices.append(FakeDevice(len(devices), p.process_id, p.node, gpu))
  return devices


def describe(plans: list[Plan], mesh_config, mesh) -> str:
  """The processes table and the mesh: which node:GPU sits at each (data, fsdp, context, tensor) position (a row
  per data, context and tensor index, naming context only when the mesh splits the sequence)."""
  p0 = plans[0]
  own = "only its own GPUs (CUDA_VISIBLE_DEVICES per task)" if p0.own_gpus_only else "all the node's GPUs"
  lines = [f"{_n(p0.nodes, 'node')} x {p0.gpus_per_node} GPUs, {_n(p0.procs_per_node, 'process')} per node = "
           f"{_n(p0.num_processes, 'process')}; each sees {own}; coordinator {p0.coordinator or '- (one process)'}",
           f"{'process':>7}  {'node':>4}  {'local_device_ids':<16}  GPUs of the node"]
  for p in plans:
    ids = ",".join(map(str, p.local_device_ids)) if p.local_device_ids is not None else "all"
    lines.append(f"{p.process_id:>7}  {p.node:>4}  {ids:<16}  {','.join(p.gpus)}")
  data, fsdp, context, tensor = mesh.shape
  nodes = p0.nodes
  split = ""
  if nodes > 1:
    dcn = (nodes // mesh_config.dcn_fsdp, mesh_config.dcn_fsdp, 1, 1)
    ici = tuple(s // d for s, d in zip(mesh.shape, dcn))
    split = f"; across nodes {dcn}, inside a node {ici} (mesh.dcn_fsdp={mesh_config.dcn_fsdp})"
  lines += ["", f"mesh (data, fsdp, context, tensor) = {mesh.shape}{split}", "position -> node:GPU"]
  for d in range(data):
    for c in range(context):
      for t in range(tensor):
        for start in range(0, fsdp, 8):
          cells = " ".join(f"{dev!r:>7}" for dev in mesh[d, start:start + 8, c, t])
          where = f"data={d:<3} " + (f"context={c:<2} " if context > 1 else "") + f"tensor={t:<2}"
          lines.append(f"{where} fsdp {start:>3}-{min(start + 8, fsdp) - 1:<3} {cells}")
  return "\n".join(lines)


def _n(count: int, noun: str) -> str:
  return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def dry_run(config, plans: list[Plan]):
  """(text, mesh array) for `config` laid over the processes of `plans` (one per process, in process order)."""
  from jaxllm import config as config_lib, sharding  # the library above start-up; only the dry run needs it

  if any(p.gpus is None for p in plans):
    raise ConfigError("--dry-run: the GPUs per node are unknown; simulate with --nodes N --gpus-per-node G or "
                      "set JAXLLM_GPUS_PER_NODE")
  devices = fake_devices(plans)
  config_lib.validate_mesh(config, len(devices))
  try:
    mesh = sharding.layout(config.mesh, devices, plans[0].procs_per_node)
  except ValueError as e:  # a layout that cannot fit is what a dry run is for: one line, like a bad config
    raise ConfigError(str(e)) from None
  if reason := sharding.rows_across_processes(mesh, sharding.rules_of(config)):
    raise ConfigError(reason)
  return describe(plans, config.mesh, mesh), mesh


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxllm.distributed", description="Print every process's "
                                   "plan and the mesh they would build, without starting jax.distributed.")
  parser.add_argument("--dry-run", action="store_true", required=True)
  parser.add_argument("--config", required=True, help="FILE[:arg], e.g. configs/pretrain.py:size=7b,gpus=4x8")
  parser.add_argument("--nodes", type=int, help="simulate SLURM: this many nodes (default: read the environment)")
  parser.add_argument("--gpus-per-node", type=int, default=8, help="with --nodes (default 8)")
  parser.add_argument("--procs-per-node", type=int, default=1, help="with --nodes: 1, or one per GPU (default 1)")
  parser.add_argument("--gpus-per-task", action="store_true", help="with --nodes: each task sees only its own "
                      "GPUs (srun --gpus-per-task), not all the node's")
  args, overrides = parser.parse_known_args(argv)
  from jaxllm import config as config_lib

  try:
    config = config_lib.load(args.config)
    for item in overrides:  # --config.mesh.dcn_fsdp=2, as the training command takes them
      key, sep, value = item.removeprefix("--config.").partition("=")
      if not item.startswith("--config.") or not sep:
        raise ConfigError(f"{item}: expected --config.key=value")
      config_lib.override(config, key, config_lib.literal(value))
    if args.nodes is not None:
      envs = [simulated_env(args.nodes, args.gpus_per_node, args.procs_per_node, i, gpus_per_task=args.gpus_per_task)
              for i in range(args.nodes * args.procs_per_node)]
      plans = [plan(e) for e in envs]
    else:  # this process from its real environment; the others as it implies
      me = plan(os.environ)
      print(f"process {me.process_id} (node {me.node}): coordinator {me.coordinator}, local_device_ids "
            f"{me.local_device_ids}, GPUs {me.gpus}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}")
      if me.process_id != 0:
        return 0
      plans = [plan(sibling_env(os.environ, me, i)) for i in range(me.num_processes)]
    text, _ = dry_run(config, plans)
  except ValueError as e:  # ConfigError, or a config file's own refusal (configs/pretrain.py: an unknown gpus=)
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(text)
  print("nothing started (--dry-run): jax.distributed.initialize would get each process's row above")
  return 0


if __name__ == "__main__":
  sys.exit(main())

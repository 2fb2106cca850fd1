"""Multi-node start-up (issue #18): every process's jax.distributed.initialize arguments from SLURM's variables,
the node-granule mesh, the errors of layouts that cannot work, and the --dry-run that prints them. No training:
jax.distributed.initialize is mocked and devices are fakes with an id and a process index."""

import os
import subprocess

import jax
import ml_collections
import numpy as np
import pytest
from jax.experimental import mesh_utils

from jaxllm import distributed, sharding
from jaxllm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "configs", "pretrain.py")


def slurm(nodes, gpus, per_node, pid, *, own_gpus=False, **extra):
  """What srun gives task `pid` of `nodes` x `per_node` tasks on nodes of `gpus` GPUs (block distribution), written
  out independently of distributed.simulated_env; own_gpus: CUDA_VISIBLE_DEVICES lists only the task's GPUs."""
  share, local = gpus // per_node, pid % per_node
  visible = range(local * share, (local + 1) * share) if own_gpus else range(gpus)
  env = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": str(nodes * per_node), "SLURM_PROCID": str(pid),
         "SLURM_LOCALID": str(local), "SLURM_NODEID": str(pid // per_node), "SLURM_STEP_NUM_NODES": str(nodes),
         "SLURM_NNODES": str(nodes), "SLURM_STEP_NODELIST": "gpu-a[017-020]" if nodes > 1 else "gpu-a017",
         "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
         "SLURM_GPUS_ON_NODE": str(gpus), "CUDA_VISIBLE_DEVICES": ",".join(map(str, visible))}
  env.update(extra)
  return {k: v for k, v in env.items() if v is not None}


PORT = str(123456 % 4096 + 61440)  # jax's SLURM port for job 123456


@pytest.fixture
def init_calls(monkeypatch):
  """The keyword arguments of each jax.distributed.initialize call (mocked: nothing is started)."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(distributed, "_JOINED", None)
  before = jax.config.jax_cpu_collectives_implementation
  yield calls
  jax.config.update("jax_cpu_collectives_implementation", before)


def joined(env, calls):
  """initialize(env)'s arguments to jax.distributed.initialize, without the timeout."""
  assert distributed.initialize(env)
  kwargs = calls.pop()
  assert kwargs.pop("initialization_timeout") == 300
  assert kwargs.pop("cluster_detection_method") == "deactivate"  # jax's SLURM guess (GPU SLURM_LOCALID) is off
  return kwargs


def test_one_node_one_process_joins_nothing_and_drives_all_eight_gpus(init_calls):
  env = slurm(1, 8, 1, 0)
  assert not distributed.initialize(env) and init_calls == []
  p = distributed.plan(env)
  assert (p.num_processes, p.local_device_ids, p.gpus) == (1, None, tuple("01234567"))


def test_one_node_one_process_per_gpu(init_calls):
  for pid in range(8):
    assert joined(slurm(1, 8, 8, pid), init_calls) == dict(
        coordinator_address=f"gpu-a017:{PORT}", num_processes=8, process_id=pid, local_device_ids=[pid])
  assert distributed.procs_per_node() == 8


@pytest.mark.parametrize("gpu_vars", [dict(), dict(SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE="h100:8"),
                                      dict(SLURM_GPUS_ON_NODE=None, JAXLLM_GPUS_PER_NODE="8")])
def test_four_nodes_one_process_per_node_drives_every_gpu(init_calls, gpu_vars):
  for pid in range(4):
    assert joined(slurm(4, 8, 1, pid, **gpu_vars), init_calls) == dict(
        coordinator_address=f"gpu-a017:{PORT}", num_processes=4, process_id=pid, local_device_ids=list(range(8)))
  assert distributed.procs_per_node() == 1


def test_four_nodes_one_process_per_node_without_gpu_variables_sees_all(init_calls):
  """No GPU count anywhere: the process drives all it sees (not jax's default, GPU 0 alone)."""
  env = slurm(4, 8, 1, 2, SLURM_GPUS_ON_NODE=None, CUDA_VISIBLE_DEVICES=None)
  assert joined(env, init_calls)["local_device_ids"] is None


@pytest.mark.parametrize("own_gpus", [False, True], ids=["node-visible", "task-visible"])
def test_four_nodes_one_process_per_gpu(init_calls, own_gpus):
  """Every task sees the node's 8 GPUs and takes GPU SLURM_LOCALID; or (--gpus-per-task, cgroups) it sees only
  its own, as device 0."""
  for pid in range(32):
    kwargs = joined(slurm(4, 8, 8, pid, own_gpus=own_gpus), init_calls)
    assert kwargs == dict(coordinator_address=f"gpu-a017:{PORT}", num_processes=32, process_id=pid,
                          local_device_ids=[0] if own_gpus else [pid % 8])
    p = distributed.plan(slurm(4, 8, 8, pid, own_gpus=own_gpus))
    assert (p.node, p.gpus, p.own_gpus_only) == (pid // 8, (str(pid % 8),), own_gpus)
  assert distributed.procs_per_node() == 8


def test_two_processes_per_node_split_the_gpus_in_halves(init_calls):
  assert joined(slurm(4, 8, 2, 5), init_calls)["local_device_ids"] == [4, 5, 6, 7]
  assert joined(slurm(4, 8, 2, 5, own_gpus=True), init_calls)["local_device_ids"] == [0, 1, 2, 3]


def test_manual_launch_reads_only_the_jaxllm_variables(init_calls):
  env = dict(JAXLLM_COORDINATOR="10.0.0.1:1234", JAXLLM_NUM_PROCESSES="16", JAXLLM_PROCESS_ID="11",
             JAXLLM_PROCS_PER_NODE="4", JAXLLM_GPUS_PER_NODE="8", SLURM_NTASKS="3")  # a stray SLURM variable
  assert joined(env, init_calls) == dict(coordinator_address="10.0.0.1:1234", num_processes=16, process_id=11,
                                         local_device_ids=[6, 7])
  assert distributed.plan(env).node == 2
  # CPU processes (tests): nothing known about GPUs, so no restriction; each process its own node
  cpu = dict(JAXLLM_COORDINATOR="127.0.0.1:1234", JAXLLM_NUM_PROCESSES="2", JAXLLM_PROCESS_ID="1")
  assert joined(cpu, init_calls)["local_device_ids"] is None
  assert distributed.procs_per_node() == 1
  assert joined(dict(cpu, JAXLLM_LOCAL_DEVICE_IDS="2,3"), init_calls)["local_device_ids"] == [2, 3]


def test_coordinator_is_the_first_host_of_the_step():
  assert distributed.first_host("node[003-004,009],login1") == "node003"
  assert distributed.first_host("rack[1-2]-gpu[07-08]") == "rack1-gpu07"
  assert distributed.first_host("a01,a02") == "a01"
  assert distributed.plan(slurm(4, 8, 1, 1, JAX_COORDINATOR_PORT="5000")).coordinator == "gpu-a017:5000"


@pytest.mark.parametrize("env, message", [
    (slurm(4, 8, 3, 0), r"SLURM_GPUS_ON_NODE=8 GPUs per node do not split evenly over 3 processes per node "
                        r"\(SLURM_STEP_TASKS_PER_NODE='3\(x4\)'\)"),
    (slurm(4, 8, 8, 0, SLURM_NTASKS="30"), r"SLURM_NTASKS=30 is not SLURM_STEP_NUM_NODES=4 nodes x 8 processes per "
                                           r"node \(SLURM_STEP_TASKS_PER_NODE='8\(x4\)'\)"),
    (slurm(4, 8, 8, 9, SLURM_LOCALID="2"), r"SLURM_LOCALID=2 is not SLURM_PROCID=9 mod 8 .*--distribution=block"),
    (slurm(4, 8, 8, 0, CUDA_VISIBLE_DEVICES="0,1,2"), r"CUDA_VISIBLE_DEVICES='0,1,2' shows 3 GPUs: neither the "
                                                      r"node's 8 \(SLURM_GPUS_ON_NODE\) nor this process's 1"),
    (slurm(4, 8, 2, 0, SLURM_STEP_TASKS_PER_NODE="2(x3),1"), r"SLURM_STEP_TASKS_PER_NODE='2\(x3\),1': nodes run "
                                                             r"different numbers of tasks"),
    (slurm(4, 8, 8, 0, JAXLLM_PROCS_PER_NODE="1"), r"JAXLLM_PROCS_PER_NODE=1 disagrees with "
                                                   r"SLURM_STEP_TASKS_PER_NODE='8\(x4\)'"),
    (slurm(4, 8, 8, 0, SLURM_GPUS_ON_NODE=None), r"8 processes per node .* GPUs per node are unknown: set "
                                                 r"JAXLLM_GPUS_PER_NODE"),
    (slurm(4, 8, 8, 0, SLURM_GPUS_ON_NODE="1"), r"SLURM_GPUS_ON_NODE=1 GPUs per node do not split evenly"),
    (dict(JAXLLM_COORDINATOR="h:1", JAXLLM_NUM_PROCESSES="6", JAXLLM_PROCESS_ID="0", JAXLLM_PROCS_PER_NODE="4"),
     r"JAXLLM_PROCS_PER_NODE=4 does not divide JAXLLM_NUM_PROCESSES=6"),
], ids=["gpus-not-divisible", "ntasks-disagree", "cyclic", "visible-count", "uneven", "procs-disagree",
        "gpus-unknown", "per-task-gpu-count", "manual-not-divisible"])
def test_bad_combinations_name_the_variables(init_calls, env, message):
  with pytest.raises(ConfigError, match=message):
    distributed.initialize(env)
  assert init_calls == []


class Device:
  """What the layout reads of a device."""
  platform, device_kind = "gpu", "fake GPU"

  def __init__(self, id, process_index):
    self.id, self.process_index = id, process_index

  def __repr__(self):
    return f"d{self.id}"


def gpus(nodes, per_node, gpus_per_node=8):
  """nodes x gpus_per_node devices of nodes*per_node processes, numbered process by process as jax does."""
  share = gpus_per_node // per_node
  return [Device(i, i // share) for i in range(nodes * gpus_per_node)]


def mesh_config(data, fsdp, tensor=1, dcn_fsdp=1, context=None):
  """A mesh config; without `context`, one from before the context axis (as an old run's), which has context 1."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_fsdp=dcn_fsdp)
                                   | ({} if context is None else {"context": context}))


def test_one_process_per_node_keeps_the_hybrid_layout_of_process_granules():
  for cfg, dcn in ((mesh_config(4, 8), (4, 1, 1, 1)), (mesh_config(1, 32, dcn_fsdp=4), (1, 4, 1, 1)),
                   (mesh_config(4, 4, 2), (4, 1, 1, 1)), (mesh_config(2, 16, dcn_fsdp=2), (2, 2, 1, 1)),
                   (mesh_config(1, 4, dcn_fsdp=4, context=8), (1, 4, 1, 1))):
    devices = gpus(4, 1)
    ici = tuple(s // d for s, d in zip(sharding.mesh_shape(cfg, 32), dcn))
    want = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)
    assert (sharding.layout(cfg, devices, 1) == want).all()


@pytest.mark.parametrize("per_node", [1, 2, 8])
def test_node_granules_put_data_across_nodes_and_fsdp_inside_one(per_node):
  """7b on 4x8: data d is node d, fsdp f its GPU f, however many processes drive the node."""
  mesh = sharding.layout(mesh_config(4, 8), gpus(4, per_node), per_node)
  node_gpu = np.vectorize(lambda d: (d.id // 8, d.id % 8), otypes=[object])(mesh)
  assert mesh.shape == (4, 8, 1, 1)
  assert all(node_gpu[d, f, 0, 0] == (d, f) for d in range(4) for f in range(8))
  # 70b on 4x8 (mesh.dcn_fsdp=4): one fsdp group over the 4 nodes, 8 consecutive positions per node
  mesh = sharding.layout(mesh_config(1, 32, dcn_fsdp=4), gpus(4, per_node), per_node)
  assert [d.id for d in mesh[0, :, 0, 0]] == list(range(32))


def test_one_node_of_eight_processes_is_one_granule():
  assert [d.id for d in sharding.layout(mesh_config(1, 8), gpus(1, 8), 8).ravel()] == list(range(8))


def test_process_granules_cannot_lay_out_one_process_per_gpu():
  """The failure this fixes: 32 processes taken for 32 hosts."""
  with pytest.raises(ValueError, match=r"cannot be laid over 32 nodes"):
    sharding.layout(mesh_config(4, 8), gpus(4, 8), 1)


def dry_run(capsys, *args):
  assert distributed.main(["--dry-run", "--config", f"{PRETRAIN}:size=7b,gpus=4x8", *args]) == 0
  return capsys.readouterr().out


MESH_4x8 = [f"data={d} tensor=0 fsdp 0-7 " + " ".join(f"n{d}:g{g}" for g in range(8)) for d in range(4)]


def mesh_rows(lines):
  """The printed mesh: a row per data index (and tensor index, and 8 fsdp positions), spaces collapsed."""
  return [" ".join(line.split()) for line in lines if line.startswith("data=")]


def test_dry_run_four_nodes_one_process_per_node(capsys):
  out = dry_run(capsys, "--nodes", "4", "--gpus-per-node", "8", "--procs-per-node", "1").splitlines()
  assert out[0] == ("4 nodes x 8 GPUs, 1 process per node = 4 processes; each sees all the node's GPUs; "
                    "coordinator node001:61586")
  assert out[3] == "      1     1  0,1,2,3,4,5,6,7   0,1,2,3,4,5,6,7"
  assert ("mesh (data, fsdp, context, tensor) = (4, 8, 1, 1); across nodes (4, 1, 1, 1), inside a node (1, 8, 1, 1)"
          in out[7])
  assert mesh_rows(out) == MESH_4x8


@pytest.mark.parametrize("own_gpus", [False, True], ids=["node-visible", "task-visible"])
def test_dry_run_four_nodes_one_process_per_gpu(capsys, own_gpus):
  out = dry_run(capsys, "--nodes", "4", "--procs-per-node", "8", *(["--gpus-per-task"] if own_gpus else []))
  lines = out.splitlines()
  assert lines[0].startswith("4 nodes x 8 GPUs, 8 processes per node = 32 processes; each sees "
                             + ("only its own GPUs" if own_gpus else "all the node's GPUs"))
  assert lines[2 + 13].split() == ["13", "1", "0" if own_gpus else "5", "5"]  # process, node, local ids, GPU
  assert mesh_rows(lines) == MESH_4x8


def test_dry_run_from_slurm_variables(capsys, monkeypatch):
  """Inside the job each task checks its real variables; task 0 also prints the whole layout."""
  for name in list(os.environ):
    if name.startswith(("SLURM_", "JAXLLM_")) or name == "CUDA_VISIBLE_DEVICES":
      monkeypatch.delenv(name)
  for name, value in slurm(4, 8, 8, 13, own_gpus=True).items():
    monkeypatch.setenv(name, value)
  assert dry_run(capsys).splitlines() == [f"process 13 (node 1): coordinator gpu-a017:{PORT}, local_device_ids (0,), "
                                          "GPUs ('5',), CUDA_VISIBLE_DEVICES=5"]
  for name, value in slurm(4, 8, 8, 0, own_gpus=True).items():
    monkeypatch.setenv(name, value)
  lines = dry_run(capsys).splitlines()
  assert lines[1].startswith("4 nodes x 8 GPUs, 8 processes per node = 32 processes; each sees only its own GPUs")
  assert mesh_rows(lines) == MESH_4x8


def test_dry_run_refuses_a_layout_that_cannot_fit(capsys):
  assert distributed.main(["--dry-run", "--config", f"{PRETRAIN}:size=70b,gpus=4x8", "--nodes", "4",
                           "--procs-per-node", "2", "--config.mesh.dcn_fsdp=2"]) == 2
  assert capsys.readouterr().err.strip() == (
      "error: mesh: (data, fsdp, context, tensor)=(1, 32, 1, 1) cannot be laid over 4 nodes as (2, 2, 1, 1) nodes "
      "per axis (mesh.dcn_fsdp=2, 2 processes per node)")


def test_sbatch_dry_run_outside_slurm_simulates_the_job():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXLLM_"))}
  env.update(DRY_RUN="1", NODES="4", PROCS_PER_NODE="8")
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), f"{PRETRAIN}:size=7b,gpus=4x8",
                        "/nonexistent/workdir"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("4 nodes x 8 GPUs, 8 processes per node = 32 processes")
  assert not os.path.exists("/nonexistent/workdir")


def test_context_stays_inside_a_node_and_a_process(capsys):
  """7b at 32k on 4x8 (context=8 per node, fsdp=4 across nodes): one process per node lays each row's context
  group on one node's 8 GPUs; one process per GPU would split a row over 8 processes, which each read their own
  rows, and is refused, as is tensor over processes."""
  out = distributed.main(["--dry-run", "--config", f"{PRETRAIN}:size=7b,gpus=4x8,seq=32k", "--nodes", "4"])
  lines = capsys.readouterr().out.splitlines()
  assert out == 0 and ("mesh (data, fsdp, context, tensor) = (1, 4, 8, 1); across nodes (1, 4, 1, 1), inside a "
                       "node (1, 1, 8, 1) (mesh.dcn_fsdp=4)") in lines
  assert mesh_rows(lines) == [f"data=0 context={g} tensor=0 fsdp 0-3 " + " ".join(f"n{n}:g{g}" for n in range(4))
                              for g in range(8)]
  long = mesh_config(1, 4, dcn_fsdp=4, context=8)
  assert sharding.rows_across_processes(sharding.layout(long, gpus(4, 1), 1)) is None
  per_gpu = sharding.layout(long, gpus(4, 8), 8)
  assert sharding.rows_across_processes(per_gpu) == (
      "mesh: a batch row lies on 8 devices (mesh.context=8) of processes [0, 1, 2, 3, 4, 5, 6, 7], but each process "
      "reads its own rows; keep the axes that split a row inside one process: one process per node (PROCS_PER_NODE=1)")
  assert distributed.main(["--dry-run", "--config", f"{PRETRAIN}:size=7b,gpus=4x8,seq=32k", "--nodes", "4",
                           "--procs-per-node", "8"]) == 2
  assert "a batch row lies on 8 devices (mesh.context=8)" in capsys.readouterr().err
  tensor = sharding.layout(mesh_config(4, 4, tensor=2), gpus(4, 8), 8)
  assert "(mesh.tensor=2) of processes [0, 1]" in sharding.rows_across_processes(tensor)

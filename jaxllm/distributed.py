"""Multi-process (multi-host) start-up with jax.distributed, configured from the environment.

  JAXLLM_COORDINATOR=host:port JAXLLM_NUM_PROCESSES=N JAXLLM_PROCESS_ID=i python -m jaxllm.train ...

Under SLURM (srun with one task per node or per GPU) nothing needs setting: jax reads SLURM's variables.
JAXLLM_INIT_TIMEOUT (seconds, default 300) bounds the wait for the other processes.
"""

from __future__ import annotations

import os

import jax


def initialize(env=None) -> bool:
  """Joins the processes of a multi-process run; a no-op for a single process. Returns whether it joined."""
  env = os.environ if env is None else env
  timeout = int(env.get("JAXLLM_INIT_TIMEOUT", "300"))
  if "JAXLLM_COORDINATOR" in env:
    kwargs = dict(coordinator_address=env["JAXLLM_COORDINATOR"], num_processes=int(env["JAXLLM_NUM_PROCESSES"]),
                  process_id=int(env["JAXLLM_PROCESS_ID"]))
    if "JAXLLM_LOCAL_DEVICE_IDS" in env:
      kwargs["local_device_ids"] = [int(i) for i in env["JAXLLM_LOCAL_DEVICE_IDS"].split(",")]
  elif int(env.get("SLURM_NTASKS", "1")) > 1:
    kwargs = {}  # jax's SLURM cluster detection fills in coordinator, process count and id
  else:
    return False
  # CPU processes (tests, laptops) need a collectives backend; GPUs use NCCL regardless of this flag.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
  return True

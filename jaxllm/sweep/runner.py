"""Running a sweep's points: as local processes (N at a time, each on its share of the CPU cores or GPUs) or as
SLURM job arrays. Each point runs `python -m jaxllm.train` in DIR/<name>/, so a rerun of the sweep resumes an
interrupted point from its checkpoint (the trainer's own resume), skips a finished one and retries a failed one.

DIR/<name>/status.json records each point: {"status": "running" | "done" | "failed" | "interrupted",
"returncode", "wall_s", "error" (the last line the run printed on stderr), "attempts"}.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from jaxllm.errors import PREEMPTED_EXIT_CODE
from jaxllm.sweep.points import Point

STATUS = "status.json"
LOG = "train.log"


def read_status(point_dir: str) -> dict:
  path = os.path.join(point_dir, STATUS)
  if not os.path.exists(path):
    return {"status": "pending", "attempts": 0}
  with open(path) as f:
    return json.load(f)


def write_status(point_dir: str, **fields):
  os.makedirs(point_dir, exist_ok=True)
  with open(os.path.join(point_dir, STATUS + ".tmp"), "w") as f:
    json.dump(fields, f)
  os.replace(os.path.join(point_dir, STATUS + ".tmp"), os.path.join(point_dir, STATUS))


def flag(key: str, value) -> str:
  """`--config.key=value` as ml_collections' config flags parse it."""
  return f"--config.{key}={value if isinstance(value, str) else repr(value)}"


def command(point: Point, sweep_dir: str) -> list[str]:
  """The training command of a point, its init_from reference resolved to the other point's run."""
  args = [sys.executable, "-m", "jaxllm.train", "--config", point.config,
          "--workdir", os.path.join(sweep_dir, point.name)]
  for key, value in point.resolved(lambda name: os.path.join(sweep_dir, name)).items():
    args.append(flag(key, value))
  return args


def _last_error(log_path: str) -> str:
  """The last `error: ...` line a run printed, else its last line."""
  try:
    with open(log_path, errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except FileNotFoundError:
    return ""
  errors = [line for line in lines if line.startswith(("error:", "preempted:"))]
  return (errors or lines or [""])[-1][:500]


def run_point(point: Point, sweep_dir: str, *, env=None, cores: set | None = None) -> subprocess.Popen:
  """Starts a point's run (its output appended to DIR/<name>/train.log) and marks it running; with `cores`, its
  process runs on those CPU cores only (set by a small exec wrapper: a fork of this process, which may have
  started jax's threads, must not run Python code)."""
  point_dir = os.path.join(sweep_dir, point.name)
  attempts = read_status(point_dir).get("attempts", 0) + 1
  write_status(point_dir, status="running", attempts=attempts, started=time.time(), returncode=None, wall_s=0.0,
               error="")
  log = open(os.path.join(point_dir, LOG), "a")
  log.write(f"--- attempt {attempts}: {shlex.join(command(point, sweep_dir))}\n")
  log.flush()
  args = command(point, sweep_dir)
  if cores:
    pin = f"import os, sys; os.sched_setaffinity(0, {sorted(cores)}); os.execv(sys.executable, sys.argv[1:])"
    args = [sys.executable, "-c", pin, *args]
  return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())


def finish_point(point: Point, sweep_dir: str, returncode: int):
  """Records how a point's run ended: done (0), interrupted (preempted: the rerun resumes) or failed."""
  point_dir = os.path.join(sweep_dir, point.name)
  status = "done" if returncode == 0 else "interrupted" if returncode == PREEMPTED_EXIT_CODE else "failed"
  previous = read_status(point_dir)
  write_status(point_dir, status=status, returncode=returncode, attempts=previous.get("attempts", 1),
               wall_s=previous.get("wall_s", 0.0) + time.time() - previous.get("started", time.time()),
               error="" if returncode == 0 else _last_error(os.path.join(point_dir, LOG)))


def _core_groups(parallel: int) -> list[set]:
  """This process's CPU cores split into `parallel` groups (a point's XLA threads stay on its group)."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if len(cores) < parallel:
    return [set(cores)] * parallel
  size = len(cores) // parallel
  return [set(cores[i * size:(i + 1) * size]) for i in range(parallel)]


def run_local(points: list[Point], sweep_dir: str, *, parallel: int = 1, gpus: list[str] | None = None,
              log=print, poll: float = 0.5) -> dict[str, str]:
  """Runs every point not yet done, `parallel` at a time, each pinned to its share of the cores (and of `gpus`,
  the CUDA device ids, when given); a point starts once the points it starts from are done. A failing point is
  recorded and the others go on. Returns {name: final status}."""
  todo = [p for p in points if read_status(os.path.join(sweep_dir, p.name))["status"] != "done"]
  done = {p.name for p in points} - {p.name for p in todo}
  failed, running = set(), {}  # name -> (process, slot)
  slots, walls, start = list(range(parallel)), [], time.time()
  groups = _core_groups(parallel)
  per_slot = [gpus[i::parallel] for i in range(parallel)] if gpus else None
  last_counts, last_log = None, 0.0
  while todo or running:
    for p in [p for p in todo if any(a in failed for a in p.after)]:
      write_status(os.path.join(sweep_dir, p.name), status="failed", returncode=None, attempts=0, wall_s=0.0,
                   error=f"not run: {', '.join(p.after)} (which it starts from) failed")
      failed.add(p.name)
      todo.remove(p)
    for p in [p for p in todo if all(a in done for a in p.after)]:
      if not slots:
        break
      slot = slots.pop(0)
      env = dict(os.environ)
      if per_slot:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(per_slot[slot])
      cores = groups[slot] if parallel > 1 and hasattr(os, "sched_setaffinity") else None
      running[p.name] = (run_point(p, sweep_dir, env=env, cores=cores), slot, p)
      todo.remove(p)
    for name, (proc, slot, p) in list(running.items()):
      if proc.poll() is None:
        continue
      finish_point(p, sweep_dir, proc.returncode)
      (done if proc.returncode == 0 else failed).add(name)
      walls.append(read_status(os.path.join(sweep_dir, name))["wall_s"])
      slots.append(slot)
      del running[name]
    counts = (len(done), len(running), len(failed), len(todo))
    if counts != last_counts or time.time() - last_log > 60:  # on every change, else once a minute
      log(_progress(*counts, walls, parallel, time.time() - start))
      last_counts, last_log = counts, time.time()
    if todo or running:
      time.sleep(poll)
  return {p.name: read_status(os.path.join(sweep_dir, p.name))["status"] for p in points}


def _progress(done: int, running: int, failed: int, waiting: int, walls: list, parallel: int, elapsed: float) -> str:
  eta = ""
  if walls and (running or waiting):
    seconds = sum(walls) / len(walls) * (running + waiting) / parallel
    eta = f" | eta {time.strftime('%H:%M:%S', time.gmtime(seconds))}"
  return (f"sweep: {done} done, {running} running, {failed} failed, {waiting} waiting | "
          f"{time.strftime('%H:%M:%S', time.gmtime(elapsed))} elapsed{eta}")


def slurm_scripts(points: list[Point], sweep_dir: str, *, repo: str, sbatch_args: list[str] = ()) -> list[str]:
  """One `sbatch --array` script per dependency level of the unfinished points (a level starts from runs of the
  levels before it), and DIR/slurm_submit.sh, which submits them chained with --dependency=afterok. Each array
  task runs one point through `python -m jaxllm.sweep run-point`; a preempted task (exit 75) is requeued and
  resumes from its checkpoint. Returns the paths written."""
  todo = [p for p in points if read_status(os.path.join(sweep_dir, p.name))["status"] != "done"]
  level, names = {}, {p.name for p in todo}
  for p in todo:  # points are in dependency order
    level[p.name] = 1 + max((level[a] for a in p.after if a in names), default=-1)
  scripts = []
  for i in range(max(level.values(), default=-1) + 1):
    batch = [p.name for p in todo if level[p.name] == i]
    listing = os.path.join(sweep_dir, f"slurm_points_{i}.txt")
    with open(listing, "w") as f:
      f.write("\n".join(batch) + "\n")
    path = os.path.join(sweep_dir, f"slurm_array_{i}.sbatch")
    with open(path, "w") as f:
      f.write(f"""#!/usr/bin/env bash
#SBATCH --job-name=jaxllm-sweep-{i}
#SBATCH --array=0-{len(batch) - 1}
#SBATCH --output={sweep_dir}/slurm-%A_%a.out
#SBATCH --requeue
#SBATCH --open-mode=append
{"".join(f"#SBATCH {a}{chr(10)}" for a in sbatch_args)}# One point of the sweep {sweep_dir} per array task ({listing}); exit 75 (preempted, checkpoint saved) requeues.
set -uo pipefail
cd {shlex.quote(repo)}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${{XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}}
name=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(listing)})
{shlex.quote(sys.executable)} -m jaxllm.sweep run-point --workdir {shlex.quote(sweep_dir)} --point "$name"
rc=$?
if [ "$rc" -eq {PREEMPTED_EXIT_CODE} ]; then
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit "$rc"
""")
    scripts.append(path)
  submit = os.path.join(sweep_dir, "slurm_submit.sh")
  with open(submit, "w") as f:
    f.write("#!/usr/bin/env bash\n# Submits the sweep's arrays, each level after the one before it succeeded.\n"
            "set -euo pipefail\ndep=\"\"\n")
    for path in scripts:
      f.write(f"job=$(sbatch --parsable $dep {shlex.quote(path)})\necho \"submitted {os.path.basename(path)}: "
              f"$job\"\ndep=\"--dependency=afterok:${{job%%;*}}\"\n")
  os.chmod(submit, 0o755)
  return scripts + [submit]

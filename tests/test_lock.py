"""jaxllm.lock: one writer per workdir, with real child processes holding, racing for and dying with the lock;
each test twice, with flock and with the mkdir fallback forced."""

import calendar
import errno
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from jaxllm import lock as lock_lib
from jaxllm.lock import WorkdirLock, WorkdirLocked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()

# A child: reports the modules that importing jaxllm.lock pulled in, takes the lock (at once, or on "go" from
# stdin), says "locked" or "refused", then obeys stdin: "release" (or EOF), "exit" (ends holding it: a crash), or
# "fork" (forks a sleeping grandchild, reports its pid, then ends holding the lock).
CHILD = r"""
import json, os, sys, time
before = set(sys.modules)
import jaxllm.lock as L
foreign = {m.split(".")[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names) - {"jaxllm"}
workdir, mode, start = sys.argv[1:4]
L.USE_FLOCK = mode == "flock"
def say(**kw):
  print(json.dumps(kw), flush=True)
say(event="ready", pid=os.getpid(), foreign=sorted(foreign))
if start == "go":
  sys.stdin.readline()
try:
  lock = L.WorkdirLock(workdir).acquire()
except L.WorkdirLocked as e:
  say(event="refused", message=str(e), holder=e.holder)
  sys.exit(0)
say(event="locked", pid=os.getpid(), method=lock.method, stale=lock.stale)
command = sys.stdin.readline().strip()
if command == "exit":
  os._exit(0)
if command == "fork":
  pid = os.fork()
  if pid == 0:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
      os.dup2(null, fd)
    time.sleep(30)
    os._exit(0)
  say(event="forked", pid=pid, still_held=lock.held)
  os._exit(0)
lock.release()
"""


class Child:
  def __init__(self, workdir, mode, start="now"):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(workdir), mode, start], cwd=REPO, env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.pid = self.proc.pid
    self._lines = queue.Queue()
    threading.Thread(target=self._pump, daemon=True).start()
    ready = self.read()
    assert ready["event"] == "ready" and ready["pid"] == self.pid, ready
    assert ready["foreign"] == [], f"jaxllm.lock imported non-stdlib modules: {ready['foreign']}"

  def _pump(self):
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put(None)

  def read(self, timeout=10):
    line = self._lines.get(timeout=timeout)
    assert line is not None, f"child {self.pid} ended (rc {self.proc.wait()}) without answering"
    try:
      return json.loads(line)
    except ValueError:
      rest = []
      while (more := self._lines.get(timeout=5)) is not None:
        rest.append(more)
      raise AssertionError(f"child {self.pid} said: {line}{''.join(rest)}") from None

  def send(self, command):
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()

  def finish(self, command="release"):
    self.send(command)
    assert self.proc.wait(timeout=10) == 0


@pytest.fixture
def spawn():
  children = []

  def start(*args, **kwargs):
    children.append(Child(*args, **kwargs))
    return children[-1]

  yield start
  for child in children:
    if child.proc.poll() is None:
      child.proc.kill()
    child.proc.wait()


@pytest.fixture(params=["flock", "mkdir"])
def mode(request, monkeypatch):
  monkeypatch.setattr(lock_lib, "USE_FLOCK", request.param == "flock")
  return request.param


def _refusal(workdir, **kwargs):
  t0 = time.monotonic()
  with pytest.raises(WorkdirLocked) as info:
    WorkdirLock(workdir, **kwargs).acquire()
  return info.value, time.monotonic() - t0


def test_refused_while_another_process_holds_it(tmp_path, mode, spawn):
  workdir = tmp_path / "run"
  child = spawn(workdir, mode)
  locked = child.read()
  assert locked == {"event": "locked", "pid": child.pid, "method": mode, "stale": None}
  error, seconds = _refusal(workdir)
  assert seconds < 2
  message = str(error)
  assert "\n" not in message
  assert f"pid {child.pid} on host {HOST} since " in message and " UTC (lock " in message, message
  lock_path = str(workdir / (".lock" if mode == "flock" else ".lock.d"))
  assert f"{workdir} is in use by " in message and lock_path in message, message
  assert message.endswith("; stop that run or choose another --workdir"), message
  assert error.holder["pid"] == child.pid and error.holder["host"] == HOST and error.lock_path == lock_path
  child.finish("release")
  with WorkdirLock(workdir) as lock:
    assert lock.stale is None and lock.method == mode


@pytest.mark.parametrize("after_crash", [False, True])
def test_two_processes_started_together_one_wins(tmp_path, mode, spawn, after_crash):
  """Started at once, on a fresh workdir or on one whose holder crashed: exactly one takes it."""
  for i in range(2):
    workdir = tmp_path / f"run{i}"
    crashed = None
    if after_crash:
      crashed = spawn(workdir, mode)
      assert crashed.read()["event"] == "locked"
      crashed.finish("exit")
    a, b = spawn(workdir, mode, "go"), spawn(workdir, mode, "go")
    a.send("go")
    b.send("go")
    said = {a.pid: a.read(), b.pid: b.read()}
    winners = [pid for pid, event in said.items() if event["event"] == "locked"]
    losers = [pid for pid, event in said.items() if event["event"] == "refused"]
    assert len(winners) == 1 and len(losers) == 1, said
    refusal = said[losers[0]]
    assert f"pid {winners[0]} on host {HOST}" in refusal["message"] and "\n" not in refusal["message"], refusal
    stale = said[winners[0]]["stale"]
    if crashed is None:
      assert stale is None, said
    elif mode == "flock" or stale is not None:  # mkdir: the loser may have removed the dead one's directory
      assert stale["pid"] == crashed.pid, said  # before the winner ever saw it
    winner, loser = (a, b) if a.pid == winners[0] else (b, a)
    assert loser.proc.wait(timeout=10) == 0
    winner.finish("release")
    with WorkdirLock(workdir) as lock:
      assert lock.stale is None


def test_sigkilled_holder_is_taken_over_as_stale(tmp_path, mode, spawn):
  workdir = tmp_path / "run"
  child = spawn(workdir, mode)
  assert child.read()["event"] == "locked"
  os.kill(child.pid, signal.SIGKILL)
  child.proc.wait(timeout=10)
  t0 = time.monotonic()
  lock = WorkdirLock(workdir).acquire()
  try:
    assert time.monotonic() - t0 < 2
    assert lock.stale["pid"] == child.pid and lock.stale["host"] == HOST, lock.stale
    message = lock.stale_message()
    assert message.startswith(f"previous run pid {child.pid} on host {HOST} since ") and "\n" not in message
    assert message.endswith(f"ended without releasing {workdir} (crash); taking over"), message
    assert lock.record["pid"] == os.getpid()
  finally:
    lock.release()
  with WorkdirLock(workdir) as lock:
    assert lock.stale is None


def test_holder_that_exits_without_releasing_is_stale(tmp_path, mode, spawn):
  child = spawn(tmp_path, mode)
  assert child.read()["event"] == "locked"
  child.finish("exit")
  with WorkdirLock(tmp_path) as lock:
    assert lock.stale["pid"] == child.pid


def test_release_on_exit_and_on_exception(tmp_path, mode):
  workdir = tmp_path / "a" / "b"  # created
  with WorkdirLock(workdir) as lock:
    assert lock.held and lock.stale is None and lock.method == mode
  assert not lock.held
  with pytest.raises(ValueError):
    with WorkdirLock(workdir) as lock:
      raise ValueError("inside the with block")
  assert not lock.held
  lock = WorkdirLock(workdir)
  lock.acquire()
  assert lock.stale is None
  lock.release()
  lock.release()  # twice: harmless
  lock.acquire()  # the same object again
  assert lock.stale is None
  lock.release()
  WorkdirLock(workdir).release()  # never acquired: harmless
  if mode == "flock":
    assert (workdir / ".lock").read_text() == ""  # left in place, empty
  else:
    assert sorted(os.listdir(workdir)) == []


def test_second_lock_in_the_same_process_is_refused(tmp_path, mode):
  with WorkdirLock(tmp_path) as first:
    error, seconds = _refusal(tmp_path)
    assert seconds < 1 and f"pid {os.getpid()} (this process) on host {HOST}" in str(error), str(error)
    with pytest.raises(RuntimeError, match="already held"):
      first.acquire()
    assert first.held
  with WorkdirLock(tmp_path) as lock:  # the refusal damaged nothing
    assert lock.stale is None


def test_holder_record(tmp_path):
  with WorkdirLock(tmp_path) as lock:
    record = json.loads((tmp_path / ".lock").read_text())
    assert record == lock.record
    assert record["pid"] == os.getpid() and record["host"] == HOST and record["argv"] == sys.argv
    started = calendar.timegm(time.strptime(record["started"], "%Y-%m-%dT%H:%M:%SZ"))  # ISO 8601 UTC
    assert abs(time.time() - started) < 60


def test_refusal_waits_briefly_for_the_holder_record(tmp_path):
  """A holder that has taken the flock but not yet written its record: acquire retries for up to `wait` s."""
  fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
  try:
    lock_lib.fcntl.flock(fd, lock_lib.fcntl.LOCK_EX)
    record = {"pid": 4242, "host": "node7", "started": "2026-12-02T04:10:05Z", "argv": ["train"]}
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, json.dumps(record).encode(), 0))
    writer.start()
    error, seconds = _refusal(tmp_path, wait=1.5)
    writer.join()
    assert 0.25 < seconds < 1.5, seconds
    assert str(error) == (f"{tmp_path} is in use by pid 4242 on host node7 since 2026-12-02 04:10:05 UTC "
                          f"(lock file {tmp_path / '.lock'}); stop that run or choose another --workdir")
    os.ftruncate(fd, 0)  # never written: refused after `wait`, holder unknown
    error, seconds = _refusal(tmp_path, wait=0.3)
    assert 0.3 <= seconds < 1.5 and error.holder is None and "\n" not in str(error)
    assert "in use by another process (its holder record is not written yet)" in str(error), str(error)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a dead holder's record, and the lock busy (a process the dead one forked): retried, then named
    os.pwrite(fd, json.dumps(dict(record, pid=dead.pid, host=HOST)).encode(), 0)
    error, seconds = _refusal(tmp_path, wait=0.3)
    assert 0.3 <= seconds < 1.5 and error.holder["pid"] == dead.pid
    assert f"in use by another process (the record names pid {dead.pid} on host {HOST} since " in str(error)
    assert "UTC, no longer running) (lock file" in str(error), str(error)
  finally:
    os.close(fd)


def test_no_flock_on_this_filesystem_falls_back_to_mkdir(tmp_path, monkeypatch):
  def flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(lock_lib.fcntl, "flock", flock)
  with WorkdirLock(tmp_path) as lock:
    assert lock.method == "mkdir" and lock.path == str(tmp_path / ".lock.d")
    assert json.loads((tmp_path / ".lock.d" / "holder.json").read_text()) == lock.record
    error, _ = _refusal(tmp_path)
    assert f"(lock directory {tmp_path / '.lock.d'})" in str(error)
  assert not (tmp_path / ".lock.d").exists()


def test_mkdir_fallback_stale_rules(tmp_path, monkeypatch):
  """This host and this process id but not held here: a restarted container reusing the pid, stale. Another
  host: cannot be checked, refused."""
  monkeypatch.setattr(lock_lib, "USE_FLOCK", False)
  (tmp_path / ".lock.d").mkdir()
  record = {"pid": os.getpid(), "host": HOST, "started": "2026-12-02T04:10:05Z", "argv": []}
  (tmp_path / ".lock.d" / "holder.json").write_text(json.dumps(record))
  with WorkdirLock(tmp_path) as lock:
    assert lock.stale == record
  (tmp_path / ".lock.d").mkdir()
  (tmp_path / ".lock.d" / "holder.json").write_text(json.dumps(dict(record, host="elsewhere", pid=1)))
  error, _ = _refusal(tmp_path)
  assert "pid 1 on host elsewhere since 2026-12-02 04:10:05 UTC" in str(error)
  (tmp_path / ".lock.d" / "holder.json").write_text("{garbled")  # unreadable: refused after `wait`
  error, seconds = _refusal(tmp_path, wait=0.2)
  assert 0.2 <= seconds < 1.5 and f"remove {tmp_path / '.lock.d'} if no run is using it" in str(error), str(error)
  (tmp_path / ".lock.d" / "holder.json").unlink()  # empty (never made so by this module): replaced
  with WorkdirLock(tmp_path) as lock:
    assert lock.stale is None
  assert sorted(os.listdir(tmp_path)) == []


def test_forked_child_does_not_keep_the_lock(tmp_path, spawn):
  """The holder forks (a multiprocessing worker) and dies: its orphan must not keep the workdir locked."""
  child = spawn(tmp_path, "flock")
  assert child.read()["event"] == "locked"
  child.send("fork")
  forked = child.read()
  assert forked["event"] == "forked" and forked["still_held"] is True
  try:
    assert child.proc.wait(timeout=10) == 0
    with WorkdirLock(tmp_path) as lock:
      assert lock.stale["pid"] == child.pid
  finally:
    os.kill(forked["pid"], signal.SIGKILL)

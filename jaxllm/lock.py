"""One writer per run directory: an exclusive lock on `workdir/.lock`, held for the whole of a training run.

Two training processes on one workdir interleave metrics.jsonl and overwrite each other's checkpoints, so a run
takes this lock before it writes anything there and keeps it to the end:

  with WorkdirLock(workdir) as lock:   # raises WorkdirLocked, naming the holder, if another run has it
    if lock.stale:
      log(lock.stale_message())        # "previous run pid 1234 on host node7 ... ended without releasing ..."
    ...

How. `acquire()` creates the workdir if needed, opens `workdir/.lock`, takes an exclusive non-blocking `fcntl.flock`
on it and then writes the holder record into the file: JSON {"pid", "host", "started" (ISO 8601 UTC), "argv"}. The
kernel drops a flock when the last descriptor of its open file is closed, so also when the process dies, even by
SIGKILL or the OOM killer: a crashed run never blocks the next one. A record still in the file when the lock is
taken was left by a holder that ended without releasing (a crash); it is kept as `lock.stale` (a dict, else None).
`release()` empties the record and unlocks; the file stays (deleting it would race with other acquirers: one could
lock the unlinked file while another creates and locks a new one). Releasing twice, or a lock never taken, is a
no-op.

A busy lock raises WorkdirLocked at once if its holder record is readable; while the record is empty or half
written (the holder has just locked and not yet written it, or is just releasing) acquire retries for up to `wait`
seconds (1 s), then raises naming what it could read.

Within one process: flocks taken through different open files conflict, so a second WorkdirLock on a workdir that
this process already holds is refused like any other (two concurrent runs in one process are as bad as in two);
sequential use (acquire, release, acquire), e.g. tests that train twice, works. A child made by fork() alone (a
multiprocessing worker) closes its inherited copy of the descriptor at once and does not hold the lock, so the
holder's death still frees it; children made by exec (subprocess) never inherit it.

Multi-process (multi-host) runs: all processes of a run share the workdir and only one of them may hold the lock;
the caller decides which, normally process 0 (`if jax.process_index() == 0: lock = WorkdirLock(workdir).acquire()`).
This module knows nothing of jax and imports only the standard library.

Filesystems without flock (some network filesystems raise ENOLCK or EOPNOTSUPP): acquire falls back to a lock
directory, `workdir/.lock.d` with the record in `.lock.d/holder.json`, made by os.mkdir under a private name with
the record written in it, then renamed into place: atomic everywhere, and failing when another process's directory
is there, so the directory never appears without its record; release renames it aside and removes it. Nothing
removes a directory when its process dies, so one whose holder is on this host and no longer alive (os.kill(pid, 0))
is taken over as stale, as is one recorded by this very process id when this process holds no lock on the workdir (a
restarted container that reuses the pid); a holder on another host cannot be checked and counts as alive (remove
`.lock.d` by hand after a crash there). Set USE_FLOCK = False to force the fallback (tests).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import sys
import time
import weakref

try:
  import fcntl
except ImportError:  # not POSIX: the mkdir fallback only
  fcntl = None

LOCK_FILE = ".lock"         # the flock file, holding the record
LOCK_DIR = ".lock.d"        # the fallback's lock directory
RECORD_FILE = "holder.json"  # the fallback's record, inside LOCK_DIR
USE_FLOCK = True            # False: always the mkdir fallback

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}  # flock unsupported on this filesystem
_POLL_S = 0.05
_held = weakref.WeakSet()  # this process's held locks


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir. `holder` is its record (a dict, or None if unreadable)."""

  def __init__(self, message: str, workdir: str | None = None, lock_path: str | None = None,
               holder: dict | None = None):
    super().__init__(message)
    self.workdir, self.lock_path, self.holder = workdir, lock_path, holder

  def __reduce__(self):
    return type(self), (str(self), self.workdir, self.lock_path, self.holder)


def holder_record() -> dict:
  """This process's record: pid, host, start time (ISO 8601 UTC) and argv."""
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": list(sys.argv)}


def describe(record: dict | None) -> str:
  """'pid 1234 on host node7 since 2026-12-02 04:10:05 UTC' (as much as the record holds)."""
  if not record or not any(k in record for k in ("pid", "host", "started")):
    return "an unknown process (unreadable holder record)"
  parts = [f"pid {record.get('pid', '?')}"]
  if record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
    parts.append("(this process)")
  parts.append(f"on host {record.get('host', '?')}")
  if "started" in record:
    try:
      started = datetime.datetime.fromisoformat(str(record["started"]).replace("Z", "+00:00"))
      parts.append("since " + started.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    except ValueError:
      parts.append(f"since {record['started']}")
  return _one_line(" ".join(parts))


class WorkdirLock:
  """An exclusive lock on a run directory; see the module docstring. `with WorkdirLock(workdir) as lock: ...`

  While held: `method` is "flock" or "mkdir", `path` the lock file (or directory), `record` the record written.
  After acquire: `stale` is the record left by a previous holder that ended without releasing, else None."""

  def __init__(self, workdir, *, wait: float = 1.0):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.wait = wait
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.method: str | None = None
    self.record: dict | None = None
    self.stale: dict | None = None
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self.method is not None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False

  def __repr__(self) -> str:
    return f"WorkdirLock({self.workdir!r}, {'held by ' + self.method if self.held else 'not held'})"

  def stale_message(self) -> str | None:
    """A one-line log message about the stale record taken over, or None."""
    if self.stale is None:
      return None
    return (f"previous run {describe(self.stale)} ended without releasing {self.workdir} (crash); "
            f"taking over")

  def acquire(self) -> WorkdirLock:
    """Takes the lock or raises WorkdirLocked (within about `wait` seconds). Returns self."""
    if self.held:
      raise RuntimeError(f"{self!r}: acquire() while already held")
    os.makedirs(self.workdir, exist_ok=True)
    self.stale = None
    if not (USE_FLOCK and fcntl is not None and self._acquire_flock()):
      self._acquire_mkdir()
    _held.add(self)
    return self

  def release(self) -> None:
    """Empties the record and unlocks. Harmless when not held."""
    method, self.method = self.method, None
    _held.discard(self)
    if method == "flock":
      fd, self._fd = self._fd, None
      try:
        os.ftruncate(fd, 0)  # an empty record: ended cleanly, not a crash
      finally:
        try:
          fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
          os.close(fd)
    elif method == "mkdir" and _read_record(os.path.join(self.path, RECORD_FILE)) == self.record:  # still ours
      _discard(self.path)
    self.record = None

  def _refuse(self, holder: dict | None):
    kind = "file" if self.path.endswith(LOCK_FILE) else "directory"
    if holder is None:
      who = "another process (its holder record is not written yet)"
    elif not self._alive(holder):  # e.g. a child that the dead holder forked without the at-fork hook (C code)
      who = f"another process (the record names {describe(holder)}, no longer running)"
    else:
      who = describe(holder)
    advice = "stop that run or choose another --workdir"
    if holder is None and kind == "directory":  # made by hand, or its record lost
      advice = f"stop that run, remove {self.path} if no run is using it, or choose another --workdir"
    message = f"{self.workdir} is in use by {who} (lock {kind} {self.path}); {advice}"
    return WorkdirLocked(_one_line(message), self.workdir, self.path, holder)

  def _acquire_flock(self) -> bool:
    """Takes the flock (True), raises WorkdirLocked, or returns False when this filesystem has no flock."""
    self.path = os.path.join(self.workdir, LOCK_FILE)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      deadline = time.monotonic() + self.wait
      while True:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          # Retried while the record is empty, half written or a dead holder's: the new holder has locked but not
          # yet written its own (or a fork of the dead one has yet to close its copy of the descriptor).
          holder = _parse(_pread_all(fd))
          if holder is not None and self._alive(holder) or time.monotonic() >= deadline:
            raise self._refuse(holder) from None
          time.sleep(_POLL_S)
        except OSError as e:
          if e.errno not in _NO_FLOCK:
            raise
          os.close(fd)
          fd = None
          return False
      left = _pread_all(fd)
      if left.strip():
        self.stale = _parse(left) or {"raw": left[:1000]}
      record = holder_record()
      data = json.dumps(record).encode()
      os.ftruncate(fd, 0)
      written = 0
      while written < len(data):
        written += os.pwrite(fd, data[written:], written)
      os.fsync(fd)
    except BaseException:
      if fd is not None:
        os.close(fd)  # drops the flock too, if taken
      raise
    self._fd, self.record, self.method = fd, record, "flock"
    return True

  def _acquire_mkdir(self) -> None:
    """The fallback: a directory `workdir/.lock.d` holding the record, made with os.mkdir under a private name and
    renamed into place (atomic: it fails when the name holds a directory), so it never appears without its record;
    a dead holder's directory is taken over."""
    self.path = os.path.join(self.workdir, LOCK_DIR)
    record_path = os.path.join(self.path, RECORD_FILE)
    record = holder_record()
    staged = _aside(self.path, "new")
    os.mkdir(staged)
    try:
      with open(os.path.join(staged, RECORD_FILE), "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
      deadline = time.monotonic() + self.wait
      dead = None  # a dead holder's record seen, whoever removes it
      while True:
        try:
          os.rename(staged, self.path)
          self.stale = dead
          break
        except OSError as e:
          if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        holder = _read_record(record_path)
        if holder is not None and not self._alive(holder):
          dead = holder
          if self._take_over(holder):
            continue
        elif holder is not None:
          raise self._refuse(holder) from None
        if time.monotonic() >= deadline:  # no readable record (or a lost race to take over), for `wait` s
          raise self._refuse(holder) from None
        time.sleep(_POLL_S)
    except BaseException:
      _discard(staged)
      raise
    self.record, self.method = record, "mkdir"

  def _alive(self, holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
      return True  # cannot tell
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
      return True
    if pid == os.getpid():  # this process: alive only if it holds the lock now (else a reused pid)
      return any(lock.workdir == self.workdir and lock.held for lock in list(_held))
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except OSError:  # EPERM: alive, another user's
      return True
    return True

  def _take_over(self, holder: dict) -> bool:
    """Moves a dead holder's directory aside and removes it; False if another process moved it first."""
    aside = _aside(self.path, "stale")
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    if _read_record(os.path.join(aside, RECORD_FILE)) != holder:
      # Not the dead one's: another process took it over and put its own in place since we read. Put that back.
      try:
        os.rename(aside, self.path)
      except OSError:
        pass
      return False
    _discard(aside)
    return True


def _one_line(text: str) -> str:
  return " ".join(str(text).splitlines())


def _parse(text: str) -> dict | None:
  try:
    record = json.loads(text)
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


def _pread_all(fd: int) -> str:
  chunks, offset = [], 0
  while chunk := os.pread(fd, 65536, offset):
    chunks.append(chunk)
    offset += len(chunk)
  return b"".join(chunks).decode(errors="replace")


def _read_record(path: str) -> dict | None:
  try:
    with open(path, errors="replace") as f:
      return _parse(f.read())
  except OSError:
    return None


def _aside(path: str, why: str) -> str:
  return f"{path}.{why}.{os.getpid()}.{time.monotonic_ns()}"


def _discard(directory: str) -> None:
  """Removes a lock directory: renamed aside first, so that it vanishes at once, whole."""
  aside = _aside(directory, "old")
  try:
    os.rename(directory, aside)
  except OSError:
    return
  shutil.rmtree(aside, ignore_errors=True)


def _forget_in_child() -> None:
  """After fork(): the child does not hold its parent's locks. Closing its copy of the descriptor (never LOCK_UN,
  which would unlock the parent's too) leaves the parent the only holder, so that its death frees the lock."""
  for lock in list(_held):
    if lock._fd is not None:
      try:
        os.close(lock._fd)
      except OSError:
        pass
    lock._fd, lock.method, lock.record = None, None, None
  _held.clear()


if hasattr(os, "register_at_fork"):
  os.register_at_fork(after_in_child=_forget_in_child)

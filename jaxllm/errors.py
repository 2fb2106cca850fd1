"""The errors a run refuses with: each message starts with what is at fault (a config key, a file:line, the
run directory), and the command line prints it as one line and exits 2 (75 for a preemption)."""


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the key."""


class RunError(ValueError):
  """A run directory refuses what was asked of it (a resume with a changed config, a second writer); the message
  names the directory and what differs."""


class Preempted(Exception):
  """The run got SIGTERM, saved a checkpoint of its current step and stopped; the same command resumes."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on purpose, resumable

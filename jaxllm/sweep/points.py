"""A sweep's points: read from a config file's get_sweep, named, ordered, and validated before anything runs.

A point's name is built from the axes that vary, by their short names, in the order they first appear:
`lr=0.001,seed=1`. It is stable (the same sweep gives the same names) and names its run directory.
"""

from __future__ import annotations

import dataclasses
import re

from jaxllm import config as config_lib
from jaxllm.errors import ConfigError

# Short names of the axes researchers sweep most; any other key is named by its last part.
SHORT = {"optimizer.learning_rate": "lr", "optimizer.warmup_steps": "warmup", "optimizer.schedule": "schedule",
         "optimizer.weight_decay": "wd", "train.batch_size": "bs", "train.steps": "steps", "train.seq_len": "seq",
         "model.size": "size", "lora.rank": "r", "lora.alpha": "alpha", "lora.targets": "targets",
         "dpo.beta": "beta", "dpo.kind": "kind", "data.prompt_loss_weight": "plw", "seed": "seed"}
SPECIAL = ("config", "name")  # point keys that are not config keys: its config file, an explicit name
REFERENCE = "@"               # init_from="@<point name>": the run of another point of the sweep


@dataclasses.dataclass
class Point:
  name: str
  config: str                  # config file[:arg]
  overrides: dict              # dotted key -> value (init_from references still "@name")
  after: list = dataclasses.field(default_factory=list)  # names of the points whose runs this one starts from

  def to_json(self) -> dict:
    return {"name": self.name, "config": self.config, "overrides": self.overrides, "after": self.after}

  def resolved(self, workdir_of) -> dict:
    """The overrides with an init_from reference to another point replaced by `workdir_of(its name)`."""
    source = self.overrides.get("init_from")
    if isinstance(source, str) and source.startswith(REFERENCE):
      return {**self.overrides, "init_from": workdir_of(source[1:])}
    return self.overrides


def short_names(keys) -> dict:
  """{dotted key: short name}, unique: a short name two keys share falls back to their full keys."""
  short = {k: SHORT.get(k, k.rsplit(".", 1)[-1]) for k in keys}
  taken = [s for s in short.values()]
  return {k: (s if taken.count(s) == 1 else k) for k, s in short.items()}


def format_value(value) -> str:
  """A value as it appears in a point name: numbers in their shortest form (1e-3 -> 0.001, 3e-05)."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return f"{value:g}"
  return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def axes_of(raw: list[dict]) -> list[str]:
  """The keys whose value differs between points (or is missing from some), in order of first appearance."""
  keys = list(dict.fromkeys(k for p in raw for k in p if k not in SPECIAL))
  return [k for k in keys if len({repr(p.get(k, "<unset>")) for p in raw}) > 1]


def expand(spec: str, raw: list[dict]) -> tuple[list[Point], list[str], dict]:
  """(points, axes, short names) of the raw points a get_sweep returned for the config `spec`."""
  if not raw:
    raise ConfigError(f"{spec}: get_sweep returned no points")
  axes = axes_of(raw)
  short = short_names(axes)
  points, seen = [], set()
  for i, p in enumerate(raw):
    name = p.get("name") or ",".join(f"{short[k]}={format_value(p[k])}" for k in axes if k in p) or f"point{i}"
    if name in seen:
      raise ConfigError(f"sweep point {i} ({p}): its name {name!r} repeats another point's; give one a 'name'")
    seen.add(name)
    overrides = {k: v for k, v in p.items() if k not in SPECIAL}
    points.append(Point(name, p.get("config", spec), overrides))
  names = {p.name for p in points}
  for p in points:
    source = p.overrides.get("init_from", "")
    if isinstance(source, str) and source.startswith(REFERENCE):
      if source[1:] not in names:
        raise ConfigError(f"sweep point {p.name!r}: init_from {source!r} names no point of the sweep")
      p.after = [source[1:]]
  return order(points), axes, short


def order(points: list[Point]) -> list[Point]:
  """The points with each one after those it starts from (stable otherwise); a cycle is an error."""
  done, out, left = set(), [], list(points)
  while left:
    ready = [p for p in left if all(a in done for a in p.after)]
    if not ready:
      raise ConfigError(f"sweep: the init_from references of {[p.name for p in left]} form a cycle")
    for p in ready:
      out.append(p)
      done.add(p.name)
    left = [p for p in left if p.name not in done]
  return out


def load(spec: str) -> tuple[list[Point], list[str], dict]:
  """The points of the config file `FILE[:arg]`'s get_sweep(arg)."""
  module = config_lib.load_module(spec)
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"{spec.partition(':')[0]}: defines no get_sweep(arg); a sweep file returns its points there")
  arg = spec.partition(":")[2]
  return expand(spec, module.get_sweep(arg) if arg else module.get_sweep())


def resolved_config(point: Point, workdir_of):
  """The config a point trains with: its file's config with its overrides set (an init_from reference resolved
  by `workdir_of(name)`)."""
  c = config_lib.load(point.config)
  for key, value in point.resolved(workdir_of).items():
    config_lib.override(c, key, value)
  return c


def validate(points: list[Point], num_devices: int | None = None):
  """Every point's config checked as a run would check it, before any runs; the error names the point and key.
  A reference to another point's run is checked as if that run existed."""
  for p in points:
    try:
      c = resolved_config(p, lambda name: ".")  # the referenced run does not exist yet: check the rest
      config_lib.validate(c, num_devices=num_devices)
    except ConfigError as e:
      raise ConfigError(f"sweep point {p.name!r}: {e}") from None

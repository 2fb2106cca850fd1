"""The sweep report against numbers worked out by hand: final and best per point (accuracy maximized, NaN rows
skipped), tokens/s without the compile row, mean ± sample std over seeds with points that are not done left out,
a sweep without a seed axis, and the files write() leaves behind."""

import csv
import json
import math
import os

import pytest

from jaxllm.errors import RunError
from jaxllm.sweep import report

NAN = float("nan")


def _point(root, name, rows=None, status=None, wall_s=None, tail=""):
  """DIR/<name>/metrics.jsonl from `rows` (plus a raw `tail`, e.g. a half-written line) and status.json."""
  os.makedirs(root / name, exist_ok=True)
  if rows is not None:
    (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
  if status is not None:
    (root / name / "status.json").write_text(json.dumps(
        {"status": status, "returncode": 0 if status == "done" else 1, "wall_s": wall_s, "error": "",
         "attempts": 1}))


def _sweep(root, axes, short, overrides):
  points = [{"name": ",".join(f"{short[k]}={v}" for k, v in o.items()), "overrides": o,
             "config": "configs/pretrain_tiny.py"} for o in overrides]
  (root / "sweep.json").write_text(json.dumps(
      {"config": "configs/pretrain_tiny.py", "axes": axes, "short": short, "points": points}))
  return [p["name"] for p in points]


def _simple(final_loss, final_eval, tokens_per_sec):
  return [{"step": 0, "loss": 4.0, "learning_rate": 0.0, "tokens_per_sec": 0.0, "mfu": 0.0},
          {"step": 30, "loss": final_loss, "learning_rate": 1e-3, "tokens_per_sec": tokens_per_sec, "mfu": 0.1},
          {"step": 30, "eval/loss": final_eval}]


@pytest.fixture
def lr_seed_sweep(tmp_path):
  """lr 0.001 x 3 seeds done; lr 0.01: 2 seeds done and one failed with a partial file; lr 0.1 never started."""
  names = _sweep(tmp_path, ["optimizer.learning_rate", "seed"], {"optimizer.learning_rate": "lr", "seed": "seed"},
                 [{"optimizer.learning_rate": lr, "seed": s} for lr in (0.001, 0.01) for s in (0, 1, 2)]
                 + [{"optimizer.learning_rate": 0.1, "seed": 0}])
  # The first row's tokens/s is 0 (compilation); a NaN loss in the last-but-one row; accuracy best is the max.
  _point(tmp_path, names[0], [
      {"step": 0, "loss": 4.0, "learning_rate": 0.0, "grad_norm": 1.5, "tokens_per_sec": 0.0, "mfu": 0.0},
      {"step": 10, "loss": 1.9, "learning_rate": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 1000.0, "mfu": 0.1},
      {"step": 10, "eval/loss": 2.5, "eval/rewards/accuracy": 0.5},
      {"step": 20, "eval/loss": 2.3, "eval/rewards/accuracy": 0.75},
      {"step": 20, "loss": NAN, "learning_rate": 1e-3, "grad_norm": 0.7, "tokens_per_sec": 3000.0, "mfu": 0.1},
      {"step": 30, "loss": 2.0, "learning_rate": 1e-3, "grad_norm": 0.6, "tokens_per_sec": 2000.0, "mfu": 0.1},
      {"step": 30, "eval/loss": 2.1, "eval/rewards/accuracy": 0.625}], "done", 10.0)
  _point(tmp_path, names[1], _simple(2.5, 2.4, 1500.0), "done", 20.0)
  _point(tmp_path, names[2], _simple(3.0, 2.7, 2500.0), "done", 30.0)
  _point(tmp_path, names[3], _simple(3.5, 3.6, 1000.0), "done", 40.0)
  _point(tmp_path, names[4], _simple(4.5, 4.0, 1000.0), "done", 40.0)
  _point(tmp_path, names[5], [{"step": 0, "loss": 5.0, "tokens_per_sec": 0.0}], "failed", 5.0,
         tail='{"step": 10, "lo')
  return tmp_path, names


def test_collect_gives_final_and_best_per_point(lr_seed_sweep):
  root, names = lr_seed_sweep
  rows = report.collect(str(root))
  assert [r["name"] for r in rows] == names == ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.001,seed=2",
                                                 "lr=0.01,seed=0", "lr=0.01,seed=1", "lr=0.01,seed=2", "lr=0.1,seed=0"]
  r = rows[0]
  assert (r["lr"], r["seed"], r["status"], r["steps"], r["wall_s"]) == (0.001, 0, "done", 30, 10.0)
  assert r["tokens_per_sec"] == pytest.approx(2000.0)  # (1000 + 3000 + 2000) / 3: the compile row's 0 left out
  assert (r["loss/final"], r["loss/best"]) == (2.0, 1.9)  # the NaN row is skipped
  assert (r["eval/loss/final"], r["eval/loss/best"]) == (2.1, 2.1)
  assert (r["eval/rewards/accuracy/final"], r["eval/rewards/accuracy/best"]) == (0.625, 0.75)
  assert (r["grad_norm/final"], r["grad_norm/best"]) == (0.6, 0.5)
  assert not any(k.startswith(("mfu", "learning_rate", "step/", "tokens_per_sec/")) for k in r)
  failed = rows[5]  # the half-written last line is ignored
  assert (failed["status"], failed["steps"], failed["loss/final"], failed["tokens_per_sec"]) == ("failed", 0, 5.0, None)
  pending = rows[6]
  assert (pending["lr"], pending["status"], pending["steps"], pending["wall_s"]) == (0.1, "pending", None, None)
  assert not any(k.endswith("/final") for k in pending)


def test_group_means_over_seeds_of_done_points(lr_seed_sweep):
  root, names = lr_seed_sweep
  groups = report.group(report.collect(str(root)))
  assert [(g["lr"], g["points"], g["done"]) for g in groups] == [
      (0.001, names[0:3], 3), (0.01, names[3:6], 2), (0.1, names[6:], 0)]
  assert all("seed" not in g for g in groups)
  a, b, c = groups
  assert a["loss/final"] == pytest.approx({"mean": 2.5, "std": 0.5, "n": 3})  # 2.0, 2.5, 3.0
  assert a["eval/loss/final"] == pytest.approx({"mean": 2.4, "std": 0.3, "n": 3})  # 2.1, 2.4, 2.7
  assert a["tokens_per_sec"] == pytest.approx({"mean": 2000.0, "std": 500.0, "n": 3})  # 2000, 1500, 2500
  assert a["wall_s"] == pytest.approx({"mean": 20.0, "std": 10.0, "n": 3})
  assert a["loss/best"] == pytest.approx({"mean": (1.9 + 2.5 + 3.0) / 3, "std": math.sqrt(0.91 / 3), "n": 3})
  assert a["eval/rewards/accuracy/final"] == {"mean": 0.625, "std": 0.0, "n": 1}  # only seed 0 logs it
  # The failed seed's loss of 5.0 stays out: 3.5 and 4.5 only.
  assert b["loss/final"] == pytest.approx({"mean": 4.0, "std": math.sqrt(0.5), "n": 2})
  assert c["loss/final"] == {"mean": None, "std": None, "n": 0}


def test_group_without_seed_axis_keeps_each_point_alone(tmp_path):
  names = _sweep(tmp_path, ["optimizer.learning_rate", "optimizer.name"],
                 {"optimizer.learning_rate": "lr", "optimizer.name": "opt"},
                 [{"optimizer.learning_rate": 0.001, "optimizer.name": "adamw"},
                  {"optimizer.learning_rate": 0.01, "optimizer.name": "adamw"},
                  {"optimizer.learning_rate": 0.001, "optimizer.name": "lion"},
                  {"optimizer.learning_rate": 0.01}])  # lacks the opt axis
  for name, loss in zip(names, (3.0, 2.0, 2.5, 2.2)):
    _point(tmp_path, name, _simple(loss, loss + 0.1, 1000.0), "done", 1.0)
  rows = report.collect(str(tmp_path))
  assert rows[3]["opt"] is None
  groups = report.group(rows)
  assert [(g["lr"], g["opt"], g["points"]) for g in groups] == [
      (0.001, "adamw", names[:1]), (0.01, "adamw", names[1:2]), (0.001, "lion", names[2:3]), (0.01, None, names[3:])]
  assert [g["loss/final"] for g in groups] == [{"mean": v, "std": 0.0, "n": 1} for v in (3.0, 2.0, 2.5, 2.2)]
  written = report.write(str(tmp_path))
  md = open(written["md"]).read()
  assert "## Over seeds" not in md and "No `seed` axis" in md
  assert os.path.getsize(written["loss_final_vs_lr"]) > 0  # one line per optimizer
  assert not any("_vs_opt" in k for k in written)  # a string axis is not plotted against


def test_write_leaves_csv_markdown_and_plots(lr_seed_sweep):
  root, names = lr_seed_sweep
  written = report.write(str(root))
  assert written["csv"] == str(root / "results.csv") and written["md"] == str(root / "results.md")
  with open(written["csv"], newline="") as f:
    reader = csv.DictReader(f)
    table = list(reader)
  assert reader.fieldnames == ["name", "lr", "seed", "status", "steps", "wall_s", "tokens_per_sec",
                               "eval/loss/best", "eval/loss/final", "eval/rewards/accuracy/best",
                               "eval/rewards/accuracy/final", "grad_norm/best", "grad_norm/final",
                               "loss/best", "loss/final"]
  assert [r["name"] for r in table] == names
  assert float(table[0]["loss/final"]) == 2.0 and float(table[0]["eval/rewards/accuracy/best"]) == 0.75
  assert float(table[0]["lr"]) == 0.001 and int(table[0]["steps"]) == 30
  assert (table[6]["status"], table[6]["loss/final"], table[6]["steps"]) == ("pending", "", "")

  md = open(written["md"]).read()
  assert "| lr=0.01,seed=2 | 0.01 | 2 | failed |" in md and "| lr=0.1,seed=0 | 0.1 | 0 | pending |" in md
  assert "| 0.001 | 3/3 | 2000 ± 500 (3) | 2.5 ± 0.5 (3) | 2.4 ± 0.3 (3) |" in md  # tokens/s, loss, eval/loss
  assert "| 0.1 | 0/1 | — |" in md
  assert "Left out of the means: `lr=0.01,seed=2` (failed), `lr=0.1,seed=0` (pending)." in md

  expected = ["loss_curves", "loss_final_vs_lr", "eval_loss_final_vs_lr", "eval_rewards_accuracy_final_vs_lr"]
  assert sorted(k for k in written if k not in ("csv", "md")) == sorted(expected)
  for kind in expected:
    assert written[kind] == str(root / f"{kind}.png")
    with open(written[kind], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not (root / "loss_final_vs_seed.png").exists()  # the seed is spread, not an axis to plot against


def test_write_refuses_a_directory_without_sweep_json(tmp_path):
  with pytest.raises(RunError, match="no sweep.json"):
    report.write(str(tmp_path))


def test_axis_named_like_a_column_and_list_values(tmp_path):
  """train.steps is "steps" in point names: its column is the dotted key, so the steps seen stay apart; a list
  value (lora.targets) still groups."""
  short = {"train.steps": "steps", "lora.targets": "targets", "seed": "seed"}
  names = _sweep(tmp_path, list(short), short, [{"train.steps": 30, "lora.targets": ["q", "v"], "seed": s}
                                                for s in (0, 1)])
  _point(tmp_path, names[0], _simple(2.0, 2.1, 1000.0), "done", 1.0)
  _point(tmp_path, names[1], _simple(3.0, 3.1, 1000.0), "done", 1.0)
  rows = report.collect(str(tmp_path))
  assert (rows[0]["train.steps"], rows[0]["steps"], rows[0]["targets"]) == (30, 30, ["q", "v"])
  [g] = report.group(rows)
  assert (g["train.steps"], g["targets"], g["loss/final"]) == (30, ["q", "v"], {"mean": 2.5, "std": pytest.approx(
      math.sqrt(0.5)), "n": 2})
  written = report.write(str(tmp_path))
  assert "loss_final_vs_train.steps" in written and "steps" in open(written["csv"]).readline().split(",")

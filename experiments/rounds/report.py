"""REPORT.md, rounds.png and rounds.json of experiments/rounds from its run directory. Each policy (the SFT start,
round 0, and each round's SFT and DPO models, per seed) answers held-out prompts several times at temperature 1
(experiments/dpo_beta's judge: its held-out prompts, the true reward, its KL estimator). On those samples:

  - true reward: the mean share of positive words (jaxllm/data/synthetic.py);
  - reward-model score: the mean score the reward model (the `rm` point) gives them;
  - KL(π‖π_sft): the mean over the samples of Σ_t [log π(y_t|…) − log π_sft(y_t|…)], both models scoring the
    same sampled tokens: the Monte-Carlo estimate of the KL to the SFT start on the policy's own samples;
  - the reward model's pairwise accuracy: over the pairs of one prompt's samples whose true rewards differ, the
    share it orders as the true reward does (equal scores count 1/2). A hacked reward model scores a policy's
    samples ever higher while this falls.

The verdict, from the end-of-round (DPO) policies, means over seeds: the true reward rises from round k-1 to
round k when the difference exceeds the noise, twice the standard error of the difference (each round's from its
seeds' spread; the SFT start's, and any round with one seed, from its samples'). Reproduced when it rises in
every round, partly when only some rounds rise but the last round is above the start beyond the noise, not
reproduced otherwise.

  python experiments/rounds/report.py DIR [--quick]     # (run.py calls it after the runs)
"""

import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from experiments import study  # noqa: E402
from experiments.dpo_beta import report as dpo_beta_report  # noqa: E402
from experiments.rounds import sweep  # noqa: E402
from jaxllm import runs  # noqa: E402
from jaxllm.data import chat, synthetic  # noqa: E402
from jaxllm.sweep import report as sweep_report, runner  # noqa: E402
from jaxllm.tasks import reward as reward_lib  # noqa: E402

QUICK_PROMPTS, QUICK_SAMPLES = 32, 4  # held-out prompts x samples in --quick (full: dpo_beta's, 128 x 8)
STAGES = ("sft", "dpo")               # a round's two models, in order


# ------------------------------------------------------------------------------------------ estimators


def pairwise_accuracy(scores, true) -> tuple[float, int]:
  """(accuracy, pairs) of scores against the true rewards, both [P, N] (N samples of each of P prompts): over the
  pairs (i, j) of one prompt's samples with different true rewards, the share whose scores are in the same order
  (equal scores: 1/2). NaN when no pair differs."""
  scores, true = np.asarray(scores, np.float64), np.asarray(true, np.float64)
  i, j = np.triu_indices(scores.shape[1], 1)
  d_true, d_score = true[:, i] - true[:, j], scores[:, i] - scores[:, j]
  right = np.where(d_score == 0, 0.5, (np.sign(d_score) == np.sign(d_true)).astype(np.float64))
  keep = d_true != 0
  return (float(right[keep].mean()) if keep.any() else float("nan")), int(keep.sum())


class Judge(dpo_beta_report.Judge):
  """experiments/dpo_beta's judge (its held-out prompts, π_sft as the reference, the true reward) with the reward
  model beside it; --quick: fewer prompts and samples."""

  def __init__(self, directory: str, quick: bool):
    super().__init__(directory, quick=False)
    if quick:
      self.prompts, self.samples = self.prompts[:QUICK_PROMPTS], QUICK_SAMPLES
      ids = [chat.render_prompt([{"role": "user", "content": " ".join(p)}], self.tokenizer) for p in self.prompts]
      self.prompt_ids = [p for p in ids for _ in range(self.samples)]
      self.length = max(len(p) for p in self.prompt_ids) + dpo_beta_report.NEW_TOKENS
    self.rm_cfg, self.rm_params, rm_tokenizer = runs.load_run(os.path.join(directory, "rm"))
    assert rm_tokenizer.sha256 == self.tokenizer.sha256, "the reward model starts from the SFT run"
    self.score_id = self.tokenizer.token_id(reward_lib.Reward.score_token)

  def rm_scores(self, texts: list[str]) -> np.ndarray:
    """The reward model's scores of answers to self.prompt_ids, each re-tokenized from its text as
    jaxllm.rejection_sample scores them."""
    scored = [p + self.tokenizer.encode(t) for p, t in zip(self.prompt_ids, texts)]
    return reward_lib.score_sequences(self.rm_cfg, self.rm_params, scored, self.score_id, batch_size=256,
                                      length=self.length + dpo_beta_report.NEW_TOKENS)

  def evaluate(self, cfg, params) -> dict:
    answers = self.sample(cfg, params)
    policy, mask = self.token_logps(cfg, params, answers)
    ref, _ = self.token_logps(self.cfg, self.ref_params, answers)
    kl, kl_se = dpo_beta_report.kl_estimate(policy, ref, mask)
    parsed = [self.words(a) for a in answers]
    true = np.asarray([synthetic.reward(self.positive, w) for w, _ in parsed])
    scores = self.rm_scores([self.tokenizer.decode([t for t in a if t not in self.stops]) for a in answers])
    accuracy, pairs = pairwise_accuracy(scores.reshape(-1, self.samples), true.reshape(-1, self.samples))
    return {"reward": float(true.mean()), "reward_se": float(true.std(ddof=1) / np.sqrt(len(true))),
            "kl": kl, "kl_se": kl_se, "rm_score": float(scores.mean()), "rm_accuracy": accuracy, "pairs": pairs,
            "valid": float(np.mean([ok for _, ok in parsed])), "length": float(np.mean([len(w) for w, _ in parsed])),
            "examples": [" ".join(w) for w, _ in parsed[:: self.samples][:3]],
            "answers": [" ".join(w) for w, _ in parsed]}


def selection(samples_dir: str, positive) -> dict:
  """What a round trained on (jaxllm.rejection_sample's files): the reward model's mean score of all samples and
  of the best; the true reward of the best answers and of the pairs' chosen and rejected; the share of pairs whose
  true rewards agree with the reward model's choice (equal: 1/2)."""
  read = lambda name: [json.loads(line) for line in open(os.path.join(samples_dir, name)) if line.strip()]
  best, pairs = read("best.jsonl"), read("pairs.jsonl")
  chosen = np.asarray([synthetic.reward(positive, p["chosen"]) for p in pairs])
  rejected = np.asarray([synthetic.reward(positive, p["rejected"]) for p in pairs])
  return {"rm_all": float(np.mean([np.mean(b["scores"]) for b in best])),
          "rm_best": float(np.mean([b["score"] for b in best])),
          "true_best": float(np.mean([synthetic.reward(positive, b["response"]) for b in best])),
          "true_chosen": float(chosen.mean()), "true_rejected": float(rejected.mean()), "pairs": len(pairs),
          "agreement": float(np.mean(np.where(chosen == rejected, 0.5, chosen > rejected)))}


# ------------------------------------------------------------------------------------------ the runs


def _done(directory: str, name: str) -> bool:
  return runner.read_status(os.path.join(directory, name))["status"] == "done"


def _point(evals: list[dict]) -> dict:
  """A curve point: the stats over seeds of each measure, and the standard error of the mean true reward (from the
  seeds' spread; with one seed, from its samples')."""
  out = {k: study.stats([e[k] for e in evals]) for k in ("reward", "kl", "rm_score", "rm_accuracy", "valid")}
  r = out["reward"]
  out["se"] = r["std"] / np.sqrt(r["n"]) if r["n"] > 1 else evals[0]["reward_se"]
  return out


def analyse(directory: str, quick: bool) -> dict:
  rows = {r["name"]: r for r in sweep_report.collect(directory)}
  judge = Judge(directory, quick)
  start = judge.evaluate(judge.cfg, judge.ref_params)
  # the rounds and seeds of DIR/sweep.json's points
  chains = [tuple(map(int, m.groups())) for name in rows if (m := re.fullmatch(r"round(\d+)_dpo_seed(\d+)", name))]
  rounds, seeds = max((k for k, _ in chains), default=0), max((s for _, s in chains), default=-1) + 1
  evals = {}  # (round, stage) -> [evaluation of each seed's model]
  picked = {}  # round -> [selection of each seed's samples]
  for k in range(1, rounds + 1):
    for stage in STAGES:
      evals[k, stage] = [judge.evaluate(*runs.load_run(os.path.join(directory, name))[:2])
                         for s in range(seeds) if _done(directory, name := f"round{k}_{stage}_seed{s}")]
    picked[k] = [selection(sweep.samples_dir(os.path.join(directory, "samples"), k, s), judge.positive)
                 for s in range(seeds) if _done(directory, f"round{k}_sft_seed{s}")]
  done = [k for k in range(1, rounds + 1) if evals[k, "dpo"]]
  return {"quick": quick, "rounds": rounds, "seeds": seeds, "prompts": len(judge.prompts), "samples": judge.samples,
          "start": start, "evals": evals, "selection": picked,
          "curve": [_point([start])] + [_point(evals[k, "dpo"]) for k in done],
          "sft_loss": rows["sft"].get("eval/loss/final"), "rm_accuracy": rows["rm"].get("eval/accuracy/final"),
          "rm_margin": rows["rm"].get("eval/margin/final"),
          "wall_s": {name: row.get("wall_s") for name, row in rows.items()}}


# ------------------------------------------------------------------------------------------ the verdict


def findings(result: dict) -> dict:
  """Each round's rise of the mean true reward over the round before it, with its noise; and the last round's
  over the start."""
  curve = result["curve"]
  mean = lambda k: curve[k]["reward"]["mean"]
  noise = lambda a, b: 2.0 * float(np.hypot(curve[a]["se"], curve[b]["se"]))
  steps = [(k, mean(k) - mean(k - 1), noise(k - 1, k)) for k in range(1, len(curve))]
  last = len(curve) - 1
  return {"steps": steps, "rises": sum(d > n for _, d, n in steps),
          "overall": (mean(last) - mean(0), noise(0, last)) if last else (0.0, 0.0)}


def verdict(result: dict) -> str:
  f, curve = findings(result), result["curve"]
  gain, gain_noise = f["overall"]
  steps = len(f["steps"])
  outcome = ("reproduced" if steps and f["rises"] == steps else
             "partly" if steps and gain > gain_noise else "not reproduced")
  path = lambda key, fmt: " → ".join(format(p[key]["mean"], fmt) for p in curve)
  return (f"Verdict: {outcome} — the true reward rises beyond the noise in {f['rises']} of {steps} rounds: "
          f"{path('reward', '.3f')} (round 0: the SFT start; "
          + ", ".join(f"{d:+.3f} ±{n:.3f}" for _, d, n in f["steps"])
          + f"; last round − start {gain:+.3f} ±{gain_noise:.3f}); KL to the SFT start {path('kl', '.2f')} nats; "
          f"the reward model's score {path('rm_score', '.2f')}, its pairwise accuracy on fresh samples "
          f"{path('rm_accuracy', '.2f')}")


# ------------------------------------------------------------------------------------------ outputs


def plot(directory: str, result: dict) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = (("reward", "true reward: share of positive words"), ("rm_score", "reward-model score"),
            ("kl", "KL(π‖π_sft), nats per answer"), ("rm_accuracy", "reward model's pairwise accuracy"))
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  start, evals = result["start"], result["evals"]
  rounds = sorted({k for k, _ in evals if evals[k, "dpo"]})
  for ax, (key, label) in zip(axes.flat, panels):
    for s in range(result["seeds"]):  # each seed's chain: SFT start -> (round k: SFT at k − 1/2, DPO at k)
      xs, ys = [0.0], [start[key]]
      for k in rounds:
        for x, stage in ((k - 0.5, "sft"), (k, "dpo")):
          if s < len(evals[k, stage]):
            xs.append(x)
            ys.append(evals[k, stage][s][key])
      ax.plot(xs, ys, ".-", color="gray", lw=0.7, alpha=0.6, label="each seed (SFT at k − ½, DPO at k)" if not s
              else None)
    means = [p[key]["mean"] for p in result["curve"]]
    stds = [p[key]["std"] for p in result["curve"]]
    ax.errorbar(range(len(means)), means, yerr=stds, fmt="o-", color="tab:blue", capsize=3, lw=2,
                label="end of round: mean ± std over seeds")
    if key == "rm_accuracy":
      ax.axhline(0.5, color="tab:red", ls=":", lw=1, label="chance")
    if key == "reward":
      best = [np.mean([p["true_best"] for p in result["selection"][k]]) for k in rounds]
      ax.plot([k - 1 for k in rounds], best, "v--", color="tab:green",
              label="best of N of its samples: the next round's SFT data")
    ax.set_xticks(range(len(means)))
    ax.set_xlabel("round (0: the SFT start)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("rejection sampling -> SFT -> DPO, round after round (held-out prompts, sampled at temperature 1)",
               fontsize=10)
  fig.tight_layout()
  path = os.path.join(directory, "rounds.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _cell(values: list[float], digits: int) -> str:
  s = study.stats(values)
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def write(directory: str, quick: bool = False, runtime_s: float | None = None) -> tuple[str, str]:
  """Writes DIR/REPORT.md, DIR/rounds.png, DIR/rounds.json (the curve and every evaluation) and DIR/answers.json
  (every policy's held-out answers); returns (the report's path, the verdict line)."""
  result = analyse(directory, quick)
  line = verdict(result)
  plot(directory, result)
  start, evals = result["start"], result["evals"]
  answers = {"sft": start.pop("answers")}  # each policy's held-out answers, as words: DIR/answers.json
  answers.update({f"round{k}_{stage}_seed{s}": e.pop("answers") for (k, stage), es in evals.items()
                  for s, e in enumerate(es)})
  with open(os.path.join(directory, "answers.json"), "w") as f:
    json.dump(answers, f)
  with open(os.path.join(directory, "rounds.json"), "w") as f:
    json.dump({"curve": result["curve"], "start": start, "quick": quick,
               "evals": {f"round{k}_{stage}": v for (k, stage), v in evals.items()}}, f, indent=2)
  measure = lambda e: (f"{_cell([x['reward'] for x in e], 3)} | {_cell([x['rm_score'] for x in e], 2)} | "
                       f"{_cell([x['kl'] for x in e], 2)} | {_cell([x['rm_accuracy'] for x in e], 2)} | "
                       f"{np.mean([x['valid'] for x in e]):.0%} | {np.mean([x['length'] for x in e]):.1f}")
  rows = [f"| 0 | SFT start | 1 | {measure([start])} |"]
  rows += [f"| {k} | {'SFT on the best' if stage == 'sft' else 'DPO on best/worst'} | {len(e)} | {measure(e)} |"
           for (k, stage), e in evals.items() if e]
  picked = [f"| {k} | {'SFT start' if k == 1 else f'round {k - 1} DPO'} | {len(p)} | "
            f"{_cell([x['rm_all'] for x in p], 2)} | {_cell([x['rm_best'] for x in p], 2)} | "
            f"{_cell([x['true_best'] for x in p], 3)} | {_cell([x['true_chosen'] for x in p], 3)} | "
            f"{_cell([x['true_rejected'] for x in p], 3)} | {_cell([x['agreement'] for x in p], 2)} |"
            for k, p in result["selection"].items() if p]
  examples = [f"| 0 | {' / '.join(start['examples'][:2])} |"]
  examples += [f"| {k} | {' / '.join(e[0]['examples'][:2])} |" for (k, stage), e in evals.items()
               if e and stage == "dpo"]
  f = findings(result)
  walls = result["wall_s"]
  wall = lambda stage: study.stats([w for n, w in walls.items() if n.startswith("round") and f"_{stage}_" in n])
  n_rounds, n_seeds = result["rounds"], result["seeds"]
  prompts, samples = (sweep.QUICK_PROMPTS, sweep.QUICK_SAMPLES) if quick else (sweep.PROMPTS, sweep.SAMPLES)
  text = f"""# Iterated rejection sampling, SFT and DPO (Llama 3.1's post-training loop) at tiny scale: report

{study.preamble("rounds", quick, runtime_s)}

{line}

## The start

The SFT model (round 0; experiments/dpo_beta's π_ref) reaches a held-out answer loss of {result['sft_loss']:.4f}
nats/token; its sampled answers score a true reward of {start['reward']:.3f} ± {start['reward_se']:.3f}. The reward
model, trained once from it on {'1,000' if quick else '4,000'} pairs of the language's own continuations labelled
by the true reward, orders {result['rm_accuracy']:.1%} of its held-out pairs right (mean margin
{result['rm_margin']:.2f}); on the SFT model's own samples its pairwise accuracy is {start['rm_accuracy']:.2f}.
Then {n_rounds} rounds x {n_seeds} seed{'s' if n_seeds > 1 else ''}: {prompts} fresh prompts a round, best of
{samples} samples each.

## Each policy on {result['prompts']} held-out prompts x {result['samples']} samples

Mean ± std over seeds. KL: to the SFT start, on the policy's own samples. Pairwise accuracy: the reward model
against the true reward, over the pairs of one prompt's samples whose true rewards differ. Well-formed: ended by
<|end|>, every word one of the language's.

| round | policy | seeds | true reward | RM score | KL(π‖π_sft) | RM pairwise accuracy | well-formed | words |
| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

Rises of the end-of-round true reward (noise: twice the standard error of the difference):
{", ".join(f"round {k}: {d:+.3f} (±{n:.3f}, {'rises' if d > n else 'within the noise'})" for k, d, n in f['steps'])}.

![rounds](rounds.png)

## What each round trained on

The round's samples of its policy ({prompts} prompts x {samples}), scored by the reward model: the best answer of
each prompt is the round's SFT data, its best and worst answers (when they differ) its DPO pairs. Agreement: the
share of those pairs whose true rewards order them as the reward model did.

| round | sampled from | seeds | RM score, all | RM score, best | true reward, best | true reward, chosen | true reward, rejected | agreement |
| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(picked)}

## Sampled answers (first seed, first two held-out prompts)

| round | answers |
| ---: | --- |
{chr(10).join(examples)}

Wall time per run: SFT start {walls.get('sft') or 0:.0f} s, reward model {walls.get('rm') or 0:.0f} s, a round's SFT
{wall('sft')['mean']:.0f} s and DPO {wall('dpo')['mean']:.0f} s (means; each round's sampling is outside these).
"""
  return study.save_report(directory, text), line


if __name__ == "__main__":
  print(write(sys.argv[1], quick="--quick" in sys.argv)[1])

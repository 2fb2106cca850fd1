"""REPORT.md and frontier.png of experiments/dpo_beta from its sweep directory. Each policy (and the SFT model
π_ref) answers held-out prompts SAMPLES times at temperature 1; on those samples, its true reward (the share of
positive words, jaxllm/data/synthetic.py) and KL(π‖π_ref), estimated as the mean over the samples of
Σ_t [log π(y_t|…) − log π_ref(y_t|…)], both models scoring the same sampled tokens. The verdict is computed here,
from the means over seeds:

  - β orders the frontier: over the sigmoid DPO points, Spearman's ρ(β, KL) and ρ(β, reward) are both ≤ MONOTONE
    (larger β: lower KL and lower reward);
  - DPO's frontier lies above the baseline of SFT on the preferred answers: at each baseline checkpoint's KL, the
    best reward DPO reaches (the upper hull of π_ref and the DPO checkpoints, see `frontier`) is at least the
    baseline's, within the noise (twice the standard error of the baseline's mean reward).

Beside it, the exact tabular check of what DPO optimises (`tabular_check`): a categorical policy over 16 responses
minimising the expected DPO loss under Bradley–Terry preferences lands on π_ref·exp(r/β)/Z.

  python experiments/dpo_beta/report.py DIR [--quick]     # (run.py calls it after the sweep)
"""

import collections
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from experiments import study  # noqa: E402
from experiments.dpo_beta import sweep  # noqa: E402
from jaxllm import checkpoint, generate, losses, model as model_lib, runs  # noqa: E402
from jaxllm.data import chat, synthetic  # noqa: E402
from jaxllm.sweep import report as sweep_report  # noqa: E402

MONOTONE = -0.8          # Spearman's ρ at or below this counts as a decreasing trend (5 points: ≤ 2 adjacent swaps)
TABULAR_TV = 0.02        # the tabular check passes at this total variation or less
NUM_PROMPTS, SAMPLES = 128, 8       # held-out prompts, samples of each (quick: fewer)
QUICK_PROMPTS, QUICK_SAMPLES = 16, 4
NEW_TOKENS = 2 * sweep.ANSWER_WORDS + 2  # room for a policy that does not stop after its 8 words
PROMPT_SEED = 100        # the held-out prompts: walks no data file drew (those use seeds 1 and 2)
LABELS = {"dpo": "DPO", "ipo": "IPO", "cdpo": "cDPO", "simpo": "SimPO", "preferred": "SFT on preferred"}


# ------------------------------------------------------------------------------------------ estimators


def kl_estimate(policy_logps, ref_logps, mask) -> tuple[float, float]:
  """(mean, standard error) over N sampled responses of Σ_t mask·(log π − log π_ref): the Monte-Carlo estimate of
  KL(π‖π_ref) when the responses are drawn from π. Arguments [N, T]: each token's log-prob under both models."""
  per = np.sum((np.asarray(policy_logps, np.float64) - np.asarray(ref_logps, np.float64)) * mask, axis=-1)
  return float(per.mean()), float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0


def spearman(x, y) -> float:
  """Spearman's rank correlation (ties get their mean rank); nan for fewer than 2 points or a constant side."""
  def ranks(v):
    v = np.asarray(v, float)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):  # ties: their mean rank
      r[v == value] = r[v == value].mean()
    return r
  if len(x) < 2:
    return float("nan")
  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def frontier(points, kl: float) -> float:
  """The best reward reachable at KL ≤ `kl` from (KL, reward) points: the upper hull of the points and the segments
  between them. Mixing two policies (one of them per prompt, at random) gives the mix of their rewards at a KL no
  larger than the mix of theirs (KL is convex), so every point under a segment is reachable."""
  best = max((r for k, r in points if k <= kl), default=float("-inf"))
  for (k1, r1) in points:
    for (k2, r2) in points:
      if k1 < kl < k2:
        best = max(best, r1 + (r2 - r1) * (kl - k1) / (k2 - k1))
  return best


def optimal_frontier(lang, positive, first_words, answer_words: int, betas) -> list[tuple[float, float, float]]:
  """[(β, KL, reward)] of the exact KL-regularised optimum π* ∝ chain·exp(reward/β) against the language's own
  chain (which π_ref approximates), for answers continuing the given words. The reward is a sum over words (each
  positive word adds 1/answer_words), so π* is a chain too, reweighted by a backward recursion."""
  p = lang.transitions[0]
  c = np.array([w in positive for w in lang.words], float) / answer_words
  start = np.bincount([lang.words.index(w) for w in first_words], minlength=len(lang.words)) / len(first_words)
  out = []
  for beta in betas:
    z, steps = np.ones(len(c)), []
    for _ in range(answer_words):  # backward: π*_t(s'|s) ∝ P(s'|s)·exp(c(s')/β)·Z_{t+1}(s')
      q = p * (np.exp(c / beta) * z)[None, :]
      z = q.sum(axis=1)
      steps.append(q / z[:, None])
    d, kl, reward = start, 0.0, 0.0
    for pi in steps[::-1]:
      with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.where(pi > 0, np.log(pi / np.where(p > 0, p, 1.0)), 0.0)
      kl += float(d @ (pi * log_ratio).sum(axis=1))
      d = d @ pi
      reward += float(d @ c)
    out.append((float(beta), kl, reward))
  return out


def tabular_check(n: int = 16, beta: float = 0.5, seed: int = 0, iterations: int = 200) -> dict:
  """The expected DPO loss (jaxllm.losses, sigmoid) of a categorical policy over n responses, over all ordered
  pairs (y1, y2) with y1 preferred at the Bradley–Terry probability σ(r1 − r2), for a random π_ref and random true
  rewards r, minimised by L-BFGS from π = π_ref. Its minimiser is π* = π_ref·exp(r/β)/Z; returns the total
  variations TV(π, π*) and TV(π_ref, π*) (how far the check has to move)."""
  rng = np.random.default_rng(seed)
  log_ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=n), jnp.float32))
  r = jnp.asarray(rng.normal(size=n), jnp.float32)
  first, second = (a.ravel() for a in jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij"))
  weight = jax.nn.sigmoid(r[first] - r[second]) / n ** 2  # P(pair) · P(first ≻ second)

  def expected_loss(logits):
    logp = jax.nn.log_softmax(logits)
    loss, _, _ = losses.dpo_losses(logp[first], logp[second], log_ref[first], log_ref[second], beta=beta)
    return jnp.sum(weight * loss)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(expected_loss)

  @jax.jit
  def solve(logits):
    def step(carry, _):
      logits, state = carry
      value, grad = value_and_grad(logits, state=state)
      updates, state = solver.update(grad, state, logits, value=value, grad=grad, value_fn=expected_loss)
      return (optax.apply_updates(logits, updates), state), None
    return jax.lax.scan(step, (logits, solver.init(logits)), None, length=iterations)[0][0]

  policy = np.asarray(jax.nn.softmax(solve(log_ref)), np.float64)
  target = np.asarray(jax.nn.softmax(log_ref + r / beta), np.float64)
  ref = np.exp(np.asarray(log_ref, np.float64))
  return {"n": n, "beta": beta, "tv": 0.5 * float(np.abs(policy - target).sum()),
          "tv_ref": 0.5 * float(np.abs(ref - target).sum())}


# ------------------------------------------------------------------------------------------ the policies


@functools.partial(jax.jit, static_argnames=("cfg", "vocab_limit"))
def _token_logps(cfg, params, inputs, targets, segment_ids, positions, *, vocab_limit):
  """[B, T] log-probs of the targets over the first vocab_limit ids: the distribution `generate` samples from."""
  logits = model_lib.forward(cfg, params, inputs, segment_ids, positions)[..., :vocab_limit]
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


class Judge:
  """The held-out prompts, the reference π_ref (the sft point) and the true reward: samples a policy's answers and
  scores them."""

  def __init__(self, directory: str, quick: bool):
    self.lang = synthetic.language(**sweep.LANGUAGE)
    self.positive = synthetic.positive_words(self.lang, **sweep.POSITIVE)
    rng = np.random.default_rng(PROMPT_SEED)
    self.prompts = [self.lang.walk(rng, 0, sweep.PROMPT_WORDS) for _ in range(QUICK_PROMPTS if quick else NUM_PROMPTS)]
    self.samples = QUICK_SAMPLES if quick else SAMPLES
    self.cfg, self.ref_params, self.tokenizer = runs.load_run(os.path.join(directory, "sft"))
    tok = self.tokenizer
    ids = [chat.render_prompt([{"role": "user", "content": " ".join(p)}], tok) for p in self.prompts]
    self.prompt_ids = [p for p in ids for _ in range(self.samples)]
    self.end = tok.token_id(chat.DEFAULT_TEMPLATE.end)
    self.stops = (tok.eos_id, self.end)
    self.length = max(len(p) for p in self.prompt_ids) + NEW_TOKENS  # one shape: one compiled scorer

  def sample(self, cfg, params) -> list[list[int]]:
    """SAMPLES answers to each prompt at temperature 1, cut after the first stop id (kept): the template's <|end|>,
    which the answers' loss masks train the model to write."""
    return generate.generate(cfg, params, self.prompt_ids, max_new_tokens=NEW_TOKENS, rng=jax.random.key(0),
                             temperature=1.0, stop_ids=self.stops, vocab_limit=self.tokenizer.vocab_size)

  def token_logps(self, cfg, params, answers) -> tuple[np.ndarray, np.ndarray]:
    """([N, T] log-probs of each answer's tokens under `params`, [N, T] mask of the answer tokens)."""
    n, length = len(answers), self.length
    inputs, targets = np.zeros((n, length - 1), np.int32), np.zeros((n, length - 1), np.int32)
    segments, positions = np.zeros((n, length - 1), np.int32), np.zeros((n, length - 1), np.int32)
    mask = np.zeros((n, length - 1), np.float32)
    for i, (prompt, answer) in enumerate(zip(self.prompt_ids, answers)):
      ids = prompt + answer
      inputs[i, :len(ids) - 1], targets[i, :len(ids) - 1] = ids[:-1], ids[1:]
      segments[i, :len(ids) - 1], positions[i, :len(ids) - 1] = 1, np.arange(len(ids) - 1)
      mask[i, len(prompt) - 1:len(ids) - 1] = 1.0  # the targets that are answer tokens
    logps = _token_logps(cfg, params, inputs, targets, segments, positions, vocab_limit=self.tokenizer.vocab_size)
    return np.asarray(logps), mask

  def words(self, answer: list[int]) -> tuple[list[str], bool]:
    """(the answer's words, whether it is well-formed: ended by <|end|> and every word one of the language's)."""
    words = self.tokenizer.decode([t for t in answer if t not in self.stops]).split()
    return words, bool(answer) and answer[-1] == self.end and all(w in self.lang.words for w in words)

  def evaluate(self, cfg, params) -> dict:
    answers = self.sample(cfg, params)
    policy, mask = self.token_logps(cfg, params, answers)
    ref, _ = self.token_logps(self.cfg, self.ref_params, answers)
    kl, kl_se = kl_estimate(policy, ref, mask)
    parsed = [self.words(a) for a in answers]
    rewards = [synthetic.reward(self.positive, w) for w, _ in parsed]
    return {"reward": float(np.mean(rewards)), "reward_se": float(np.std(rewards, ddof=1) / np.sqrt(len(rewards))),
            "kl": kl, "kl_se": kl_se, "valid": float(np.mean([ok for _, ok in parsed])),
            "length": float(np.mean([len(w) for w, _ in parsed])),
            "examples": [" ".join(w) for w, _ in parsed[:: self.samples][:3]]}

  def chain(self) -> dict:
    """The language's own continuations of the held-out prompts (what π_ref imitates): their mean reward, and
    KL(chain‖π_ref) per answer estimated on them, log chain(y) − log π_ref(y): how well π_ref learned the chain."""
    rng = np.random.default_rng(PROMPT_SEED + 1)
    walks = [synthetic.continuation(self.lang, rng, p[-1], sweep.ANSWER_WORDS) for p in self.prompts
             for _ in range(self.samples)]  # in the order of self.prompt_ids
    answers = [self.tokenizer.encode(" ".join(w)) + [self.end] for w in walks]  # as chat.render writes an answer
    ref, mask = self.token_logps(self.cfg, self.ref_params, answers)
    index, p = {w: i for i, w in enumerate(self.lang.words)}, self.lang.transitions[0]
    chain = [sum(np.log(p[index[a], index[b]]) for a, b in zip([prompt[-1]] + w[:-1], w))
             for prompt, w in zip([q for q in self.prompts for _ in range(self.samples)], walks)]
    per = np.asarray(chain) - np.sum(ref * mask, axis=-1)
    return {"reward": float(np.mean([synthetic.reward(self.positive, w) for w in walks])),
            "kl": float(per.mean()), "kl_se": float(per.std(ddof=1) / np.sqrt(len(per)))}


def policy_of(name: str) -> tuple[str, str, float | None]:
  """(group, kind, β) of a point name: dpo_beta0.1_seed2 -> ("dpo_beta0.1", "dpo", 0.1)."""
  group = re.sub(r"_seed\d+$", "", name)
  if m := re.fullmatch(r"dpo_beta([0-9.e+-]+)", group):
    return group, "dpo", float(m.group(1))
  return group, group.split("_")[0], None


def _stats(values) -> dict:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
  return {"mean": float(v.mean()) if len(v) else float("nan"),
          "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def checkpoint_steps(run_dir: str) -> list[int]:
  """The committed checkpoint steps of a run, oldest first (sweep.CHECKPOINTS of them: its training at 1/4, 1/2,
  3/4 and the end)."""
  directory = os.path.join(run_dir, runs.CHECKPOINTS)
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and checkpoint.commit_time(directory, int(n)))


def analyse(directory: str, quick: bool) -> dict:
  rows = {r["name"]: r for r in sweep_report.collect(directory)}
  judge = Judge(directory, quick)
  sft = judge.evaluate(judge.cfg, judge.ref_params)
  runs_of = collections.defaultdict(list)  # (group, kind, β) -> [{step: evaluation} of each seed]
  for name, row in rows.items():
    if name != "sft" and row["status"] == "done":
      run_dir = os.path.join(directory, name)
      evals = {step: judge.evaluate(*runs.load_run(run_dir, step)[:2]) for step in checkpoint_steps(run_dir)}
      evals[max(evals)]["row"] = row
      runs_of[policy_of(name)].append(evals)
  policies = {}
  for (group, kind, beta), seeds in runs_of.items():
    final = [e[max(e)] for e in seeds]
    steps = sorted(set.intersection(*(set(e) for e in seeds)))
    policies[group] = {"kind": kind, "beta": beta, "examples": final[0]["examples"],
                       **{k: _stats([e[k] for e in final]) for k in ("reward", "kl", "valid", "length")},
                       "accuracy": _stats([e["row"].get("eval/rewards/accuracy/final") for e in final]),
                       "wall_s": _stats([e["row"].get("wall_s") for e in final]),
                       "trajectory": [(step, float(np.mean([e[step]["kl"] for e in seeds])),
                                       float(np.mean([e[step]["reward"] for e in seeds])),
                                       _standard_error([e[step] for e in seeds])) for step in steps]}
  first = [p[-1] for p in judge.prompts]
  betas = np.concatenate([np.geomspace(0.01, 10.0, 40), [1e4]])
  return {"sft": sft, "chain": judge.chain(), "policies": policies, "quick": quick,
          "sft_loss": rows["sft"].get("eval/loss/final"), "sft_wall_s": rows["sft"].get("wall_s"),
          "floor": sweep.ANSWER_WORDS * judge.lang.entropy_rate(0) / (sweep.ANSWER_WORDS + 1),
          "optimum": optimal_frontier(judge.lang, judge.positive, first, sweep.ANSWER_WORDS, betas),
          "prompts": len(judge.prompts), "samples": judge.samples, "tabular": tabular_check()}


# ------------------------------------------------------------------------------------------ the verdict


def _standard_error(evals: list[dict]) -> float:
  """Of the mean reward of one checkpoint over seeds: from the seeds' spread, or with one seed its samples'."""
  rewards = [e["reward"] for e in evals]
  return float(np.std(rewards, ddof=1) / np.sqrt(len(rewards))) if len(rewards) > 1 else evals[0]["reward_se"]


def _trajectory(p: dict) -> list[tuple]:
  """A policy's (step, KL, reward, standard error of the reward) points, means over seeds at each checkpoint; its
  final point without them."""
  return p.get("trajectory") or [(None, p["kl"]["mean"], p["reward"]["mean"],
                                  p["reward"]["std"] / np.sqrt(max(p["reward"]["n"], 1)))]


def findings(result: dict) -> dict:
  """The verdict's parts, each with its numbers. β's trend: the final DPO policies. The frontier: as in the paper,
  every evaluated checkpoint of every run is a point; DPO's frontier is the hull of its points and π_ref's
  (0, reward), and each checkpoint of the baseline is compared with it at its KL."""
  policies = result["policies"]
  dpo = sorted((p["beta"], p["kl"]["mean"], p["reward"]["mean"]) for p in policies.values() if p["kind"] == "dpo")
  betas, kls, rewards = ([d[i] for d in dpo] for i in range(3))
  hull = [(0.0, result["sft"]["reward"])] + [(k, r) for p in policies.values() if p["kind"] == "dpo"
                                              for _, k, r, _ in _trajectory(p)]
  baseline = [(g, step, k, r, frontier(hull, k) - r, 2.0 * se) for g, p in policies.items()
              if p["kind"] == "preferred" for step, k, r, se in _trajectory(p)]
  out = {"betas": betas, "kls": kls, "rewards": rewards, "rho_kl": spearman(betas, kls),
         "rho_reward": spearman(betas, rewards), "baseline": baseline}
  out["kl_falls"] = bool(out["rho_kl"] <= MONOTONE)
  out["reward_falls"] = bool(out["rho_reward"] <= MONOTONE)
  out["under"] = sum(gap >= -noise for *_, gap, noise in baseline)
  out["above"] = bool(baseline) and out["under"] == len(baseline)
  return out


def verdict(result: dict) -> str:
  f = findings(result)
  claims = (f["kl_falls"], f["reward_falls"], f["above"])
  outcome = "reproduced" if all(claims) else "not reproduced" if not any(claims) else "partly"
  worst = min(f["baseline"], key=lambda b: b[4], default=None)
  closest = (f"; closest: {worst[0]} step {worst[1]}, KL {worst[2]:.2f}, reward {worst[3]:.3f} against DPO's "
             f"{worst[3] + worst[4]:.3f} (noise ±{worst[5]:.3f})" if worst else "")
  return (f"Verdict: {outcome} — DPO β {f['betas'][0]:g} → {f['betas'][-1]:g}: KL {f['kls'][0]:.2f} → "
          f"{f['kls'][-1]:.2f} nats (Spearman ρ(β, KL) = {f['rho_kl']:+.2f}), reward {f['rewards'][0]:.3f} → "
          f"{f['rewards'][-1]:.3f} (ρ(β, reward) = {f['rho_reward']:+.2f}; each must be ≤ {MONOTONE}); SFT on the "
          f"preferred answers: {f['under']} of {len(f['baseline'])} checkpoints on or under DPO's frontier (within the "
          f"noise){closest}; "
          f"π_ref's reward {result['sft']['reward']:.3f}")


# ------------------------------------------------------------------------------------------ outputs


def plot(directory: str, result: dict) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 5))
  optimum = [(k, r) for _, k, r in result["optimum"]]
  ax.plot(*zip(*optimum), ls="--", color="gray", lw=1, label="KL-regularised optimum (exact, against the chain)")
  ax.errorbar([0.0], [result["sft"]["reward"]], fmt="k*", ms=12, label="π_ref (SFT)")
  markers = {"dpo": "o", "ipo": "s", "cdpo": "D", "simpo": "^", "preferred": "v"}
  colors = {"dpo": "tab:blue", "ipo": "tab:orange", "cdpo": "tab:green", "simpo": "tab:purple",
            "preferred": "tab:red"}
  policies = result["policies"]
  kls = [t[1] for p in policies.values() for t in _trajectory(p)] + [p["kl"]["mean"] for p in policies.values()]
  hull = [(0.0, result["sft"]["reward"])] + [(k, r) for p in policies.values() if p["kind"] == "dpo"
                                              for _, k, r, _ in _trajectory(p)]
  if len(hull) > 1:
    grid = np.linspace(0.0, max(k for k, _ in hull), 200)
    ax.plot(grid, [frontier(hull, k) for k in grid], color=colors["dpo"], lw=6, alpha=0.15, label="DPO's frontier")
  labelled = set()
  for g, p in policies.items():
    kind = p["kind"]
    path = [(0.0, result["sft"]["reward"])] + [(k, r) for _, k, r, _ in _trajectory(p)]  # training, from π_ref
    ax.plot(*zip(*path), ".-", color=colors[kind], lw=0.6, ms=3, alpha=0.5)
    ax.errorbar(p["kl"]["mean"], p["reward"]["mean"], xerr=p["kl"]["std"], yerr=p["reward"]["std"],
                fmt=markers[kind], color=colors[kind], capsize=3, label=None if kind in labelled else LABELS[kind])
    labelled.add(kind)
    name = f"β={p['beta']:g}" if kind == "dpo" else g.replace("preferred_", "")
    ax.annotate(name, (p["kl"]["mean"], p["reward"]["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
  right = 1.1 * max(kls + [1.0])
  shown = [t[2] for p in policies.values() for t in _trajectory(p)]
  shown += [r for k, r in optimum if k <= right] + [result["sft"]["reward"]]
  ax.set_xlim(-0.03 * right, right)
  ax.set_ylim(min(shown) - 0.03, max(shown) + 0.03)
  ax.set_xlabel("KL(π‖π_ref), nats per answer (sampled)")
  ax.set_ylabel("true reward: share of positive words")
  ax.set_title("reward against KL: final policies (mean ± std over seeds), dots: checkpoints", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  path = os.path.join(directory, "frontier.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _order(policies: dict) -> list[str]:
  kinds = list(LABELS)
  return sorted(policies, key=lambda g: (kinds.index(policies[g]["kind"]), policies[g]["beta"] or 0.0, g))


def write(directory: str, quick: bool = False, runtime_s: float | None = None) -> tuple[str, str]:
  """Writes DIR/REPORT.md and DIR/frontier.png; returns (the report's path, the verdict line)."""
  result = analyse(directory, quick)
  line = verdict(result)
  plot(directory, result)
  policies, sft, tab = result["policies"], result["sft"], result["tabular"]
  cell = lambda s, digits: f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
  rows = "\n".join(
      f"| {LABELS[p['kind']]} | {g} | {p['reward']['n']} | {cell(p['reward'], 3)} | {cell(p['kl'], 2)} | "
      f"{p['accuracy']['mean']:.2f} | {p['valid']['mean']:.0%} | {p['length']['mean']:.1f} | "
      f"{p['wall_s']['mean']:.0f} |".replace("| nan |", "| — |")
      for g in _order(policies) for p in [policies[g]])
  examples = "\n".join(f"| {g} | {' / '.join(policies[g]['examples'][:2])} |" for g in _order(policies))
  f = findings(result)
  baseline = "\n".join(f"| {g} | {step} | {k:.2f} | {r:.3f} ± {noise / 2:.3f} | {r + gap:.3f} | {gap:+.3f} | "
                        f"{'yes' if gap >= -noise else 'no'} |" for g, step, k, r, gap, noise in f["baseline"])
  checkpoints = "\n".join(f"| {g} | " + " | ".join(f"{k:.2f}, {r:.3f}" for _, k, r, _ in _trajectory(policies[g]))
                          + " |" for g in _order(policies))
  passed = "passes" if tab["tv"] <= TABULAR_TV else "FAILS"
  sft_wall = result["sft_wall_s"] or 0.0
  text = f"""# DPO's reward-KL frontier against β at tiny scale: report

{study.preamble("dpo_beta", quick, runtime_s)}

{line}

Tabular check: TV(π, π_ref·exp(r/β)/Z) = {tab['tv']:.2e} ({passed}: ≤ {TABULAR_TV}) for the expected DPO loss of a
categorical policy over {tab['n']} responses, β = {tab['beta']:g}, minimised exactly
(TV(π_ref, π*) = {tab['tv_ref']:.3f}: the distance the check has to cover).

## The reference

π_ref (the `sft` point) reaches a held-out answer loss of {result['sft_loss']:.4f} nats/token against the chain's
floor of {result['floor']:.4f} (its entropy rate over {sweep.ANSWER_WORDS} words and a certain <|end|>). Its sampled
answers score a reward of {sft['reward']:.3f} ± {sft['reward_se']:.3f} (the chain's own continuations:
{result['chain']['reward']:.3f}), {sft['valid']:.0%} well-formed (its KL to itself estimates {sft['kl']:.2e}).
KL(chain‖π_ref), estimated on the chain's continuations of the same prompts: {result['chain']['kl']:.3f} ±
{result['chain']['kl_se']:.3f} nats per answer.

## Each policy (mean ± std over seeds)

{result['prompts']} held-out prompts x {result['samples']} samples at temperature 1 per run. Reward: the share of
positive words in an answer. KL: nats per answer. Accuracy: held-out preference accuracy at the end of training
(DPO family). Well-formed: the answer ends with <|end|> and every word is one of the language's.

| method | policy | seeds | true reward | KL(π‖π_ref) | accuracy | well-formed | words | wall s |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| π_ref | sft | 1 | {sft['reward']:.3f} | 0 | — | {sft['valid']:.0%} | {sft['length']:.1f} | {sft_wall:.0f} |
{rows}

![frontier](frontier.png)

The dashed curve is the exact KL-regularised optimum π* ∝ chain·exp(reward/β) over β, computed against the
language's own chain rather than π_ref (which approximates it): a guide to how far from optimal each point is.

## SFT on the preferred answers against DPO's frontier

Every checkpoint of the baseline (mean ± standard error over seeds) against DPO's frontier at its KL: the hull of
π_ref and every DPO checkpoint (mixing two policies reaches any point under the segment between them). "On or
under": DPO − baseline ≥ −2 standard errors.

| policy | step | KL | reward | DPO's frontier there | DPO − baseline | on or under |
| --- | ---: | ---: | ---: | ---: | ---: | --- |
{baseline}

## Checkpoints (KL, reward; mean over seeds) at 1/4, 1/2, 3/4 of training and its end

| policy | {" | ".join(f"{i}/{sweep.CHECKPOINTS}" for i in range(1, sweep.CHECKPOINTS + 1))} |
| --- | {" | ".join("---:" for _ in range(sweep.CHECKPOINTS))} |
{checkpoints}

## Sampled answers (first seed, first two prompts)

| policy | answers |
| --- | --- |
| sft | {' / '.join(sft['examples'][:2])} |
{examples}
"""
  return study.save_report(directory, text), line


if __name__ == "__main__":
  print(write(sys.argv[1], quick="--quick" in sys.argv)[1])

"""The kinds of training, by `config.stage`. A new kind is a Task subclass (tasks/base.py) and one entry here."""

from jaxllm.tasks.base import Task
from jaxllm.tasks.lm import SFT, Pretrain
from jaxllm.tasks.preference import Preference
from jaxllm.tasks.reward import Reward

TASKS: dict[str, type[Task]] = {"pretrain": Pretrain, "sft": SFT, "dpo": Preference, "reward": Reward}
STAGES = tuple(TASKS)


def make(config) -> Task:
  return TASKS[config.stage](config)

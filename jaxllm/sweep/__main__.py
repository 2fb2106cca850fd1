"""python -m jaxllm.sweep: the `jaxllm sweep` command of jaxllm/cli.py (its refusals one line, exit 2)."""

import sys

from jaxllm import cli

sys.exit(cli.main(["sweep", *sys.argv[1:]]))

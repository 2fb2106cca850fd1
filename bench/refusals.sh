#!/usr/bin/env bash
# Each run-time refusal case of bench/RESULTS.md, run against the code in REPO (default: this checkout): one table
# row per case with the exit code, the number of stderr lines, the time, and the last stderr line.
#   bench/refusals.sh OUT [REPO]
set -u
out=$(mkdir -p "$1" && cd "$1" && pwd); repo=${2:-$(cd "$(dirname "$0")/.." && pwd)}
mkdir -p "$out/corpus5" "$out/corpus1"
python3 -c "
import random, sys
r = random.Random(0); line = lambda: ' '.join(r.choice(['the cat', 'a dog', 'sees', 'the moon', 'likes']) for _ in range(30))
for i in range(5):
  open(f'$out/corpus5/doc{i}.txt', 'w').write('\n\n'.join(line() for _ in range(20)))
open('$out/corpus1/all.txt', 'w').write('\n\n'.join(line() for _ in range(100)))"
cd "$repo"
T="python -m jaxllm.train --config configs/pretrain_tiny.py"
S="--config.optimizer.warmup_steps=0 --config.train.steps=2 --config.train.num_samples=0 --config.train.eval_batches=0 --config.data.tokenizer.vocab_size=512"
case_() { name=$1; shift; start=$(date +%s.%N); "$@" > $out/$name.out 2> $out/$name.err; rc=$?; t=$(python3 -c "print(f'{$(date +%s.%N)-$start:.1f}')");
  n=$(wc -l < $out/$name.err); last=$(grep -v "^\s*$" $out/$name.err | grep -vi "warning" | tail -1 | cut -c1-220); echo "| $name | $rc | ${n} lines, ${t}s | $last |"; }
case_ batch_negative $T --workdir $out/w1 --config.train.batch_size=-4
case_ misspelt_key $T --workdir $out/w2 --config.train.batchsize=4
case_ unknown_size python -m jaxllm.train --config configs/pretrain.py:size=huge --workdir $out/w3
case_ tensor_4_tiny env XLA_FLAGS=--xla_force_host_platform_device_count=4 $T --workdir $out/w4 --config.mesh.data=1 --config.mesh.tensor=4 $S
case_ five_files $T --workdir $out/w5 --config.data.sources="$out/corpus5/*.txt" $S --config.train.eval_batches=1 --config.train.batch_size=2 --config.train.seq_len=32 --config.data.tokenizer.vocab_size=300
case_ one_file $T --workdir $out/w6 --config.data.sources="$out/corpus1/*.txt" $S --config.train.eval_batches=1 --config.train.batch_size=2 --config.train.seq_len=32 --config.data.tokenizer.vocab_size=300
case_ no_validation $T --workdir $out/w7 --config.data.sources="$out/corpus5/*.txt" $S --config.data.validation_fraction=0 --config.train.batch_size=2 --config.train.seq_len=32 --config.data.tokenizer.vocab_size=300
case_ chinese_vocab300 python -m jaxllm.train --config configs/sft.py:size=tiny --workdir $out/w8 --config.data.sources=chatterbot:chinese $S --config.data.tokenizer.vocab_size=300
$T --workdir $out/w9 $S --config.data.sources="$out/corpus5/*.txt" --config.train.batch_size=2 --config.train.seq_len=32 --config.data.validation_fraction=0.5 --config.data.tokenizer.vocab_size=300 > /dev/null 2>&1
case_ resume_changed_seed $T --workdir $out/w9 $S --config.data.sources="$out/corpus5/*.txt" --config.train.batch_size=2 --config.train.seq_len=32 --config.data.validation_fraction=0.5 --config.seed=1 --config.train.steps=3 --config.data.tokenizer.vocab_size=300
case_ resume_changed_shape $T --workdir $out/w9 $S --config.data.sources="$out/corpus5/*.txt" --config.train.batch_size=2 --config.train.seq_len=32 --config.data.validation_fraction=0.5 --config.model.d_model=64 --config.train.steps=3 --config.data.tokenizer.vocab_size=300
case_ generate_empty python -m jaxllm.generate --workdir $out/w9 --prompt ""

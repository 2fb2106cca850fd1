"""Per-GPU memory of the large presets under each mesh layout of configs/pretrain.py, without allocating.

  python bench/memory.py

Params, gradients and AdamW state come from jax.eval_shape of the real train state and the sharding rules;
activations are the estimate documented in jaxllm/memory.py.
"""

from configs import pretrain
from jaxllm import memory


def main():
  print("| model | GPUs | mesh (data, fsdp, tensor) | micro-batch/GPU | params GiB | grads GiB | AdamW GiB "
        "| activations GiB | total GiB | fits 80 GB |")
  print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
  for size, gpus in pretrain.MESHES:
    c = pretrain.get_config(f"size={size},gpus={gpus}")
    r = memory.report(c)
    micro = c.train.batch_size // c.train.grad_accum // (c.mesh.data * c.mesh.fsdp)
    print(f"| {size} | {gpus} | ({c.mesh.data}, {c.mesh.fsdp}, {c.mesh.tensor}) | {micro} | {r['params']:.2f} | "
          f"{r['grads']:.2f} | {r['optimizer']:.2f} | {r['activations']:.2f} | {r['total']:.2f} | "
          f"{'yes' if r['total'] * 2 ** 30 < 80e9 else 'NO'} |")
  print("\nfsdp against pure data parallelism on 8 GPUs (params + grads + AdamW per GPU):")
  for size in ("1b", "7b", "70b"):
    row = []
    for data, fsdp in ((8, 1), (1, 8)):
      c = pretrain.get_config(f"size={size}")
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, 1
      r = memory.report(c)
      row.append(r["params"] + r["grads"] + r["optimizer"])
    print(f"  {size}: data=8 {row[0]:.1f} GiB, fsdp=8 {row[1]:.1f} GiB, ratio {row[1] / row[0]:.4f}")


if __name__ == "__main__":
  main()

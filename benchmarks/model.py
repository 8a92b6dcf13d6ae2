"""Full Deformable DETR forward: JAX (jit) vs HuggingFace transformers (eager PyTorch) on CPU.

Each (framework, batch) runs in its own subprocess so that peak resident memory (ru_maxrss) is
measured per framework. Weights are random (speed does not depend on them). Both workers
tune glibc malloc as eval.py does (`ddetr_jax.host_malloc.tune`; `--malloc default` leaves both
at glibc's defaults), and JAX's CPU dispatch is synchronous as in eval.py (`ddetr_jax.cpu_dispatch`;
DDETR_JAX_ASYNC_DISPATCH=1 keeps JAX's asynchronous default).

  python benchmarks/model.py                       # 800x1066, batch 1 and 2, default variant
  python benchmarks/model.py --repeats 3 --batch 1
Not part of the test suite.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(batch: int, height: int, width: int):
  import numpy as np
  rng = np.random.default_rng(0)
  return rng.standard_normal((batch, height, width, 3)).astype(np.float32)


def _run_jax(args) -> dict:
  from ddetr_jax import cpu_dispatch, xla_gpu_flags
  sync_dispatch = cpu_dispatch.use_synchronous_cpu_dispatch()  # as eval.py (cli.run)
  xla_gpu_flags.disable_triton_gemm()  # as eval.py (cli.run), before JAX's first backend
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import deformable_detr
  from ddetr_jax.models import build_model
  config = deformable_detr.get_config(args.variant)
  config.model.dtype = args.dtype
  model = build_model(config)
  images = jnp.asarray(_images(args.batch, args.height, args.width))
  mask = jnp.zeros(images.shape[:3], bool)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1], mask[:1])  # two-stage: >= Q positions
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)
  forward = jax.jit(lambda p, x, m: model.apply(p, x, m)["pred_boxes"])
  start = time.perf_counter()
  compiled = forward.lower(params, images, mask).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, images, mask))  # warm-up
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, images, mask))
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "compile_s": compile_s,
          "setup": f"dispatch {'sync' if sync_dispatch else 'async'}"}


def _run_hf(args) -> dict:
  import torch
  from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
  torch.set_num_threads(os.cpu_count())
  backbone = ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                          out_features=["stage2", "stage3", "stage4"])
  config = DeformableDetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
                                backbone_config=backbone, num_labels=91,
                                with_box_refine=args.variant in ("box_refine", "two_stage"),
                                two_stage=args.variant == "two_stage")
  model = DeformableDetrForObjectDetection(config).eval()
  pixels = torch.from_numpy(_images(args.batch, args.height, args.width).transpose(0, 3, 1, 2).copy())
  mask = torch.ones(args.batch, args.height, args.width, dtype=torch.long)
  with torch.no_grad():
    model(pixel_values=pixels, pixel_mask=mask)  # warm-up
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      model(pixel_values=pixels, pixel_mask=mask)
      times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "compile_s": 0.0,
          "setup": f"{torch.get_num_threads()} threads"}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="default")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1066)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", help="JAX compute dtype")
  parser.add_argument("--malloc", default="tuned", choices=("tuned", "default"),
                      help="both workers' glibc malloc: tuned as eval.py does, or glibc's defaults")
  parser.add_argument("--worker", choices=["jax", "hf"], help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    args.batch = args.batch[0]
    sys.path.insert(0, ROOT)
    from ddetr_jax import host_malloc
    # Both workers, as eval.py: before the framework allocates.
    malloc_tuned = args.malloc == "tuned" and host_malloc.tune()
    result = (_run_jax if args.worker == "jax" else _run_hf)(args)
    result["setup"] += f", malloc {'tuned' if malloc_tuned else 'glibc default'}"
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))
    return

  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), TF_CPP_MIN_LOG_LEVEL="3")
  rows = []
  for batch in args.batch:
    results = {}
    for worker in ("jax", "hf"):
      cmd = [sys.executable, __file__, "--worker", worker, "--batch", str(batch), "--variant", args.variant,
             "--height", str(args.height), "--width", str(args.width), "--repeats", str(args.repeats),
             "--dtype", args.dtype, "--malloc", args.malloc]
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
      line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not line:
        raise SystemExit(f"{worker} worker failed:\n{proc.stderr[-3000:]}")
      results[worker] = json.loads(line[0][len("RESULT "):])
    rows.append((batch, results))
  print(f"\n{args.variant}, {args.height}x{args.width}, {os.cpu_count()} CPU threads, median of {args.repeats}, "
        f"JAX dtype {args.dtype}; JAX: {rows[0][1]['jax']['setup']}; HF: {rows[0][1]['hf']['setup']}\n")
  print("| batch | JAX (s) | HF eager (s) | JAX/HF | JAX compile (s) | JAX peak RSS (MB) | HF peak RSS (MB) |")
  print("|---|---|---|---|---|---|---|")
  for batch, r in rows:
    j, h = r["jax"], r["hf"]
    print(f"| {batch} | {j['median_s']:.2f} | {h['median_s']:.2f} | {j['median_s'] / h['median_s']:.2f} | "
          f"{j['compile_s']:.1f} | {j['peak_rss_mb']:.0f} | {h['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
  main()

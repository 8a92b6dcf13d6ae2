"""Train-step speed: ddetr_jax's jitted step vs HF transformers' model + loss + AdamW step.

  python benchmarks/train_step.py [--configs tiny,full] [--batch 2] [--size 256] [--steps 5]
                                 [--malloc tuned|default] [--attention_impl auto]
                                 [--dtype float32|bfloat16] [--hf_device auto|cpu|cuda]

For each config: JAX compile time of the train step (trainer.make_train_step, 1-device mesh) and
seconds per step after compilation, and HF `DeformableDetrForObjectDetection` (randomly
initialised, HF ResNet backbone of the same depth, no download) forward with labels (its loss and
Hungarian matcher) + backward + torch.optim.AdamW step, on the same batch size, image size and
targets, training the same parameters (backbone stages 2-4 and everything after it). `full` is
configs/deformable_detr.py:default (ResNet-50, 6+6 layers, 300 queries); `tiny` is
configs/tiny.py. JAX's CPU dispatch is synchronous as in train.py (`ddetr_jax.cpu_dispatch`;
DDETR_JAX_ASYNC_DISPATCH=1 keeps JAX's asynchronous default). The JAX model's sampler is
`--attention_impl` (default "auto": the C++ kernel on the CPU, the Pallas kernel on a GPU, as
configs/shapes.py uses; HF's model runs its PyTorch grid_sample formulation, since no hub
kernel can be fetched). HF runs on `--hf_device`: by default the kind of device JAX runs on (a
GPU when JAX has one and torch sees CUDA), so both frameworks are timed on the same processor;
on a GPU the timers wait for the queued work (`block_until_ready`, `torch.cuda.synchronize`).
Also times the backbone alone (forward + backward of stages 2-4) in both frameworks, since at
the tiny size it is most of the step, and the work per step: XLA's cost analysis of the
compiled JAX step (all arithmetic) and torch's FlopCounterMode over one HF step
(matmuls and convolutions, forward + backward), each as a share of that framework's 2048^3
matmul speed measured in the same run. The last two columns say what the target asks: 0.5 x HF's
step time, and the share of XLA's matmul speed at which the JAX step would have to run the
model's matmuls and convolutions (torch's count of them, the same architecture) to fit in it,
with nothing else in the step; above 100% the target cannot be met in that dtype on that
machine. `--dtype bfloat16` runs both in mixed precision: the JAX
model with `config.model.dtype = "bfloat16"` (bf16 matmul operands, float32 accumulation, float32
params and optimizer), HF's forward under `torch.autocast(device, torch.bfloat16)` (its standard
mixed precision: float32 params, bf16 matmuls and convolutions), and the matmul speeds are then
bf16 x bf16 with float32 accumulation. Prints a table and one JSON line per config.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name: str):
  from configs import deformable_detr, tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config("default") if name == "tiny" else deformable_detr.get_config("default")


def _batch(batch_size: int, size: int, num_classes: int, max_boxes: int = 8, seed: int = 0):
  """Images [B, S, S, 3], no padding, 1..max_boxes random boxes per image."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
  counts = rng.integers(1, max_boxes + 1, size=batch_size)
  centers = rng.uniform(0.25, 0.75, size=(batch_size, max_boxes, 2))
  sizes = rng.uniform(0.05, 0.4, size=(batch_size, max_boxes, 2))
  boxes = np.concatenate([centers, sizes], -1).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(batch_size, max_boxes)).astype(np.int32)
  box_mask = np.arange(max_boxes)[None] < counts[:, None]
  return {"images": images, "padding_mask": np.zeros((batch_size, size, size), bool),
          "boxes": boxes, "labels": labels, "box_mask": box_mask}


def compile_jax_step(config, batch: dict) -> dict:
  """ddetr_jax's train step for `config` on a 1-device mesh, compiled for `batch` and run once.

  Returns `step` (the compiled (state, batch) -> (state, metrics); the state is donated),
  `state` (the state after the warm-up step), `batch` (on the device), `compile_s` and `gflop`
  (XLA's cost analysis of the step).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ddetr_jax import optim, sharding, trainer  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import build_model  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = build_model(config)
  size = batch["images"].shape[1]
  config.data.buckets = (size,)
  params = trainer.init_params(model, config, trainer.seed_rngs(0)[0], mesh)
  tx = optim.make_optimizer(config.optim, 1000, params)
  state = sharding.replicate(trainer.TrainState(
      step=np.int32(0), params=params, opt_state=tx.init(params),
      rng=trainer.seed_rngs(0)[1]), mesh)
  step_fn = trainer.jit_train_step(
      trainer.make_train_step(model, tx, config.loss, config.model.num_classes), mesh, state)
  device_batch = sharding.shard_batch(batch, mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, device_batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis() or {}
  state, metrics = compiled(state, device_batch)  # warm-up
  jax.block_until_ready(metrics)
  return {"step": compiled, "state": state, "batch": device_batch, "compile_s": compile_s,
          "gflop": float(cost.get("flops", float("nan"))) / 1e9}


def time_jax_steps(compiled: dict, steps: int) -> tuple[float, float]:
  """(seconds per step over `steps` back-to-back steps, the last loss); advances
  compiled['state']."""
  import jax  # pylint: disable=g-import-not-at-top
  state, device_batch = compiled["state"], compiled["batch"]
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled["step"](state, device_batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  compiled["state"] = state
  return step_s, float(metrics["loss"])


def bench_jax(config, batch: dict, steps: int) -> dict:
  compiled = compile_jax_step(config, batch)
  step_s, loss = time_jax_steps(compiled, steps)
  return {"compile_s": compiled["compile_s"], "step_s": step_s, "loss": loss,
          "gflop": compiled["gflop"]}


def resolve_hf_device(choice: str, jax_platform: str, cuda_available: bool) -> str:
  """The torch device HF runs on: `choice` ('cpu' or 'cuda'), or for 'auto' the same kind of
  device as JAX's (a GPU when JAX runs on one and torch sees CUDA, else the CPU), so that the
  two frameworks are compared on one processor."""
  if choice == "auto":
    return "cuda" if jax_platform == "gpu" and cuda_available else "cpu"
  if choice not in ("cpu", "cuda"):
    raise ValueError(f"--hf_device must be auto, cpu or cuda, not {choice!r}")
  if choice == "cuda" and not cuda_available:
    raise ValueError("--hf_device cuda: torch sees no CUDA device (torch.cuda.is_available() is "
                     "False)")
  return choice


def _torch_sync(device: str) -> None:
  """Waits for the queued torch work on `device` (CUDA runs asynchronously; the CPU does not)."""
  if device == "cuda":
    import torch  # pylint: disable=g-import-not-at-top
    torch.cuda.synchronize()


def _autocast(dtype: str, device: str = "cpu"):
  """torch's mixed precision on `device` for a bfloat16 run, nothing for float32."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device, dtype=getattr(torch, dtype))


def build_hf_model(config, device: str = "cpu"):
  """HF's `DeformableDetrForObjectDetection` for `config.model` (random init, an HF ResNet of the
  same depth), in train mode on `device`, with ddetr_jax's trainable set: ResNet stages 2-4 and
  everything after them (`requires_grad` False on the stem and stage 1)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import DeformableDetrForObjectDetection  # pylint: disable=g-import-not-at-top
  from tests.test_model_hf_reference import hf_config  # pylint: disable=g-import-not-at-top
  m = config.model
  torch.manual_seed(0)
  model = DeformableDetrForObjectDetection(
      hf_config(m, dropout=m.dropout, auxiliary_loss=m.aux_loss)).to(device).train()
  # Same trainable set as the official code and ddetr_jax: ResNet stages 2-4 train, the stem and
  # stage 1 stay frozen. HF's own rule freezes the whole HF ResNet (it looks for "stage.1" in
  # parameter names that read "stages.1"), which would skip the backbone's backward pass.
  backbone_params = list(model.model.backbone.model.named_parameters())
  for name, param in backbone_params:
    param.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))
  if not any(param.requires_grad for _, param in backbone_params):
    raise RuntimeError("no trainable HF backbone parameter: the stage naming changed")
  return model


def bench_hf(config, batch: dict, steps: int, device: str = "cpu") -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  model = build_hf_model(config, device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr,
                                weight_decay=config.optim.weight_decay)
  pixel_values = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy()).to(device)
  pixel_mask = torch.from_numpy(~batch["padding_mask"]).long().to(device)
  labels = [{"class_labels": torch.from_numpy(batch["labels"][i][batch["box_mask"][i]]).long()
                             .to(device),
             "boxes": torch.from_numpy(batch["boxes"][i][batch["box_mask"][i]]).to(device)}
            for i in range(len(batch["images"]))]

  def step():
    optimizer.zero_grad()
    with _autocast(config.model.dtype, device):
      loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_max_norm)
    optimizer.step()
    return loss.detach()

  step()  # warm-up
  _torch_sync(device)
  start = time.perf_counter()
  for _ in range(steps):  # like the JAX loop: no host read of the loss until the end
    loss = step()
  _torch_sync(device)
  step_s = (time.perf_counter() - start) / steps
  loss = float(loss)
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  with FlopCounterMode(display=False) as counter:  # matmuls and convolutions, forward + backward.
    step()
  return {"step_s": step_s, "loss": loss, "gflop": counter.get_total_flops() / 1e9}


def matmul_peaks(dtype: str = "float32", size: int = 2048, repeats: int = 10,
                 torch_device: str = "cpu") -> tuple[float, float]:
  """GFLOP/s of a [size, size] @ [size, size] matmul in XLA (on JAX's default device) and in
  torch (on `torch_device`), operands in `dtype` (bf16: float32 accumulation, as the model's
  matmuls)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  flop = 2 * size ** 3 / 1e9
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  jax_s = _median_seconds(lambda: jax.block_until_ready(matmul(a, a)), repeats)
  t = torch.ones(size, size, dtype=getattr(torch, dtype), device=torch_device)

  def torch_matmul():
    _ = t @ t
    _torch_sync(torch_device)

  torch_s = _median_seconds(torch_matmul, repeats)
  return flop / jax_s, flop / torch_s


def percent_of_peak(seconds: float, gflop: float, peak_gflops: float) -> float:
  """Percent of `peak_gflops` at which `gflop` of work runs when it takes `seconds`: the speed a
  step reaches, or for a target time the speed it would need."""
  return 100.0 * gflop / seconds / peak_gflops


def _median_seconds(fn, steps: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench_jax_backbone(config, batch: dict, steps: int) -> float:
  """Seconds per forward + backward of the ResNet alone (gradients of stages 2-4 only)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models.backbone import ResNet  # pylint: disable=g-import-not-at-top
  net = ResNet(depth=config.model.backbone_depth, dtype=jnp.dtype(config.model.dtype))
  images = jnp.asarray(batch["images"])
  params = net.init(jax.random.PRNGKey(0), images)["params"]
  trainable = {k: v for k, v in params.items() if k.startswith(("layer2", "layer3", "layer4"))}
  frozen = {k: v for k, v in params.items() if k not in trainable}

  def loss(train_params, frozen_params, x):
    features = net.apply({"params": {**frozen_params, **train_params}}, x)
    return sum(jnp.sum(f.astype(jnp.float32) ** 2) for f in features)

  # Everything is an argument (nothing for XLA to constant-fold, e.g. the frozen stem).
  grad = jax.jit(jax.grad(loss))
  return _median_seconds(lambda: jax.block_until_ready(grad(trainable, frozen, images)), steps)


def bench_hf_backbone(config, batch: dict, steps: int, device: str = "cpu") -> float:
  """The same for HF's ResNet (stem and stage 1 frozen)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import ResNetBackbone  # pylint: disable=g-import-not-at-top
  from tests.test_model_hf_reference import hf_resnet_config  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = ResNetBackbone(hf_resnet_config(config.model.backbone_depth,
                                        ["stage2", "stage3", "stage4"]))
  net = net.to(device).train()
  for name, param in net.named_parameters():
    param.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))
  images = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy()).to(device)

  def step():
    net.zero_grad()
    with _autocast(config.model.dtype, device):
      features = net(images).feature_maps
    sum((f.float() ** 2).sum() for f in features).backward()
    _torch_sync(device)

  return _median_seconds(step, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,full")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--skip_hf", action="store_true")
  parser.add_argument("--matcher", default="hungarian",
                      help="JAX matcher: hungarian (in-graph) or scipy (host, like HF's)")
  parser.add_argument("--malloc", default="tuned", choices=("tuned", "default"),
                      help="tuned: ddetr_jax.host_malloc.tune() (and huge pages with "
                           "DDETR_JAX_HUGE_PAGES=1) as train.py does; default: glibc's defaults "
                           "(JAX and HF share the setting)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of both frameworks (bfloat16: JAX model.dtype, HF "
                           "under torch.autocast; params and optimizer stay float32)")
  parser.add_argument("--hf_device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="torch device of the HF model: auto (CUDA when JAX runs on a GPU and "
                           "torch sees one, else the CPU), cpu or cuda")
  parser.add_argument("--attention_impl", default="auto",
                      help="the JAX model's ms_deform_attn impl: auto, cpu, pallas, xla, "
                           "xla_packed")
  args = parser.parse_args()
  from ddetr_jax import cpu_dispatch, host_malloc, xla_gpu_flags  # pylint: disable=g-import-not-at-top
  # JAX and HF run in this process, so both always see the same allocator.
  if args.malloc == "tuned":
    host_malloc.reexec_with_huge_pages()  # with DDETR_JAX_HUGE_PAGES=1: restarts with THP
  malloc_tuned = args.malloc == "tuned" and host_malloc.tune()
  # As train.py: synchronous CPU dispatch unless DDETR_JAX_ASYNC_DISPATCH=1 (torch unaffected).
  sync_dispatch = cpu_dispatch.use_synchronous_cpu_dispatch()
  # As train.py: XLA's Triton GEMM fusion off (XLA aborted compiling the step with it on a GPU).
  xla_gpu_flags.disable_triton_gemm()
  huge_pages = host_malloc.HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ddetr_jax.ops import ms_deform_attn  # pylint: disable=g-import-not-at-top
  impl = args.attention_impl
  if impl == "auto":
    impl = ms_deform_attn.resolve_auto_impl()
  hf_device = resolve_hf_device(args.hf_device, jax.default_backend(), torch.cuda.is_available())
  if hf_device == "cuda":
    # JAX's default precision runs float32 matmuls and convolutions as TF32 on such a GPU;
    # torch's default keeps float32 matmuls exact. Both TF32, so the two do the same arithmetic.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print("float32 matmuls and convolutions: TF32 in both (JAX's default precision on the GPU; "
          "torch's allow_tf32 set to match)")
  torch_where = (f"on {torch.cuda.get_device_name()}" if hf_device == "cuda"
                 else f"on the CPU with {torch.get_num_threads()} threads")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"torch {torch.__version__} {torch_where}; batch {args.batch}, {args.size}x{args.size} px, "
        f"{args.steps} timed steps; compute dtype {args.dtype}; JAX matcher {args.matcher}, "
        f"sampler impl {impl!r}; JAX CPU dispatch {'sync' if sync_dispatch else 'async'}; "
        f"glibc malloc "
        f"{'tuned (ddetr_jax.host_malloc)' if malloc_tuned else 'left at its defaults'}"
        f"{', transparent huge pages (glibc.malloc.hugetlb=1)' if huge_pages else ''}")
  jax_peak, torch_peak = matmul_peaks(args.dtype, torch_device=hf_device)
  print(f"2048^3 {args.dtype} matmul: XLA {jax_peak:.0f} GFLOP/s, torch {torch_peak:.0f} GFLOP/s")
  print(f"{'config':8s} {'jax compile s':>14s} {'jax s/step':>11s} {'hf s/step':>10s} "
        f"{'jax/hf':>7s} {'jax backbone s':>15s} {'hf backbone s':>14s} {'jax GFLOP':>10s} "
        f"{'hf GFLOP':>9s} {'jax % peak':>10s} {'hf % peak':>9s} {'target s':>9s} "
        f"{'needed % peak':>13s}")
  nan = float("nan")
  for name in args.configs.split(","):
    config = _config(name)
    config.loss.matcher = args.matcher
    config.model.attention_impl = impl
    config.model.dtype = args.dtype
    batch = _batch(args.batch, args.size, config.model.num_classes)
    jax_result = bench_jax(config, batch, args.steps)
    jax_result["backbone_s"] = bench_jax_backbone(config, batch, args.steps)
    hf_result = None
    if not args.skip_hf:
      hf_result = bench_hf(config, batch, args.steps, hf_device)
      hf_result["backbone_s"] = bench_hf_backbone(config, batch, args.steps, hf_device)
    ratio = jax_result["step_s"] / hf_result["step_s"] if hf_result else nan
    hf_gflop = hf_result["gflop"] if hf_result else nan
    jax_pct = percent_of_peak(jax_result["step_s"], jax_result["gflop"], jax_peak)
    hf_pct = percent_of_peak(hf_result["step_s"], hf_gflop, torch_peak) if hf_result else nan
    target_s = 0.5 * hf_result["step_s"] if hf_result else nan
    needed_pct = percent_of_peak(target_s, hf_gflop, jax_peak) if hf_result else nan
    print(f"{name:8s} {jax_result['compile_s']:14.1f} {jax_result['step_s']:11.3f} "
          f"{hf_result['step_s'] if hf_result else nan:10.3f} {ratio:7.2f} "
          f"{jax_result['backbone_s']:15.3f} {hf_result['backbone_s'] if hf_result else nan:14.3f} "
          f"{jax_result['gflop']:10.1f} {hf_gflop:9.1f} {jax_pct:10.0f} {hf_pct:9.0f} "
          f"{target_s:9.3f} {needed_pct:13.0f}")
    print(json.dumps({"config": name, "attention_impl": impl, "dtype": args.dtype,
                      "jax_device": jax.devices()[0].device_kind, "hf_device": hf_device,
                      "batch": args.batch,
                      "size": args.size, "jax": jax_result, "hf": hf_result,
                      "jax_over_hf": ratio, "target_s": target_s,
                      "needed_pct_of_xla_peak": needed_pct, "matmul_gflops": {"xla": jax_peak,
                                                             "torch": torch_peak}}))


if __name__ == "__main__":
  main()

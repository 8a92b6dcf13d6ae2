"""How fast the train step would be without parts of the model: a bound on what speeding them up gains.

  python benchmarks/train_step_ablation.py [--config full] [--batch 2] [--size 256]
                                           [--rounds 6] [--steps 1]
                                           [--ablations dropout,layer_norm,sampler,self_attention]

The train-step target (benchmarks/train_step.py) asks ddetr_jax's step to take at most half of
HF transformers' step. This benchmark measures how far optimising the parts of the step that are
not matmuls or convolutions could go towards it: it compiles the same step (same config, batch,
optimizer, loss) with parts of the model taken out, and times each variant next to the unchanged
step and next to HF's step, all in one process. A variant is not a valid model; its time is a lower
bound for any implementation of the removed part.

Ablations (each alone, then all together):
  dropout          config.model.dropout = 0 (no mask generation or masking).
  layer_norm       every flax LayerNorm returns its input (the transformer's post-norms).
  sampler          the deformable-attention sampler replaced by a stand-in of O(B*Q*M*D) work that
                   reads the values, sampling locations and attention weights (so their
                   projections stay in the step).
  self_attention   the decoder's multi-head self-attention keeps only its value and output
                   projections (no query/key projections, Q x Q logits, softmax or weighted sum).

Variants are compiled first, then timed in `--rounds` alternating rounds of `--steps` steps
each (so machine drift touches all of them alike); the table gives the median per variant.
JAX's CPU dispatch is synchronous and glibc malloc tuned, as in train.py and train_step.py.
Prints a table and one JSON line.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import train_step  # pylint: disable=wrong-import-position

ABLATIONS = ("dropout", "layer_norm", "sampler", "self_attention")


def _sampler_stand_in(value, spatial_shapes, sampling_locations, attention_weights, impl):
  """value [B, S, M, D], locations [B, Q, M, L, P, 2], weights [B, Q, M, L, P] -> [B, Q, M*D]:
  value rows (Q of them, cycling through S) scaled by per-head sums of weights and locations."""
  del spatial_shapes, impl
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, q, m = attention_weights.shape[:3]
  scale = attention_weights.sum((-1, -2)) + sampling_locations.sum((-1, -2, -3))  # [B, Q, M]
  rows = value[:, np.arange(q) % value.shape[1]]  # [B, Q, M, D]
  return (scale[..., None].astype(value.dtype) * rows).reshape(b, q, -1)


def _self_attention_stand_in():
  """A MultiHeadSelfAttention with only `v_proj` and `out_proj`: [B, Q, C] -> [B, Q, C]."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import transformer  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models.dense import Dense  # pylint: disable=g-import-not-at-top

  class ValueOnlySelfAttention(transformer.MultiHeadSelfAttention):

    @nn.compact
    def __call__(self, query_key, value):
      del query_key
      c = value.shape[-1]
      values = Dense(c, dtype=self.dtype, name="v_proj")(value)
      return Dense(c, dtype=self.dtype, name="out_proj")(values)

  return ValueOnlySelfAttention


@contextlib.contextmanager
def ablated(config, ablations):
  """Within the block, models built from `config` lack `ablations` (names from ABLATIONS)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import deformable_attention, transformer  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(ablations) - set(ABLATIONS))
  if unknown:
    raise ValueError(f"unknown ablations {unknown}; choose from {list(ABLATIONS)}")
  saved = [(nn.LayerNorm, "__call__", nn.LayerNorm.__call__),
           (deformable_attention, "_ms_deform_attn", deformable_attention._ms_deform_attn),  # pylint: disable=protected-access
           (transformer, "MultiHeadSelfAttention", transformer.MultiHeadSelfAttention)]
  dropout = config.model.dropout
  try:
    if "dropout" in ablations:
      config.model.dropout = 0.0
    if "layer_norm" in ablations:
      nn.LayerNorm.__call__ = lambda self, x, *args, **kwargs: x
    if "sampler" in ablations:
      deformable_attention._ms_deform_attn = _sampler_stand_in  # pylint: disable=protected-access
    if "self_attention" in ablations:
      transformer.MultiHeadSelfAttention = _self_attention_stand_in()
    yield config
  finally:
    config.model.dropout = dropout
    for owner, name, original in saved:
      setattr(owner, name, original)


def variants(ablations) -> dict:
  """{label: ablations}: the full step, each ablation alone, and all of them (when several)."""
  out = {"none (the full step)": ()}
  out.update({f"no {name}": (name,) for name in ablations})
  if len(ablations) > 1:
    out["none of " + ", ".join(ablations)] = tuple(ablations)
  return out


def run(config_name: str, batch_size: int, size: int, rounds: int, steps: int, ablations,
        hf_steps: int = 3) -> dict:
  """Compiles every variant, times them in alternating rounds, times HF's step; returns the
  results (seconds per step: median over rounds)."""
  from ddetr_jax.ops import ms_deform_attn  # pylint: disable=g-import-not-at-top
  impl = ms_deform_attn.resolve_auto_impl()
  compiled = {}
  for label, removed in variants(ablations).items():
    config = train_step._config(config_name)  # pylint: disable=protected-access
    config.model.attention_impl = impl
    batch = train_step._batch(batch_size, size, config.model.num_classes)  # pylint: disable=protected-access
    with ablated(config, removed):
      compiled[label] = train_step.compile_jax_step(config, batch)
  times = {label: [] for label in compiled}
  for _ in range(rounds):
    for label, step in compiled.items():
      times[label].append(train_step.time_jax_steps(step, steps)[0])
  config = train_step._config(config_name)  # pylint: disable=protected-access
  batch = train_step._batch(batch_size, size, config.model.num_classes)  # pylint: disable=protected-access
  hf_s = train_step.bench_hf(config, batch, hf_steps)["step_s"]
  full_s = float(np.median(times["none (the full step)"]))
  return {"config": config_name, "batch": batch_size, "size": size, "attention_impl": impl,
          "hf_step_s": hf_s, "target_s": 0.5 * hf_s,
          "variants": {label: {"removed": list(variants(ablations)[label]),
                               "step_s": float(np.median(t)),
                               "saving_s": full_s - float(np.median(t)),
                               "compile_s": compiled[label]["compile_s"]}
                       for label, t in times.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="full", choices=("tiny", "full"))
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--steps", type=int, default=1, help="steps per variant per round")
  parser.add_argument("--ablations", default=",".join(ABLATIONS))
  args = parser.parse_args()
  ablations = tuple(a for a in args.ablations.split(",") if a)
  unknown = sorted(set(ablations) - set(ABLATIONS))
  if unknown:
    parser.error(f"--ablations: unknown {unknown}; choose from {list(ABLATIONS)}")
  from ddetr_jax import cpu_dispatch, host_malloc, xla_gpu_flags  # pylint: disable=g-import-not-at-top
  host_malloc.tune()
  cpu_dispatch.use_synchronous_cpu_dispatch()
  xla_gpu_flags.disable_triton_gemm()  # as train.py
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; config {args.config}, batch {args.batch}, "
        f"{args.size}x{args.size} px, {args.rounds} rounds of {args.steps} step(s)")
  result = run(args.config, args.batch, args.size, args.rounds, args.steps, ablations)
  print(f"HF step {result['hf_step_s']:.3f} s; target (0.5 x HF) {result['target_s']:.3f} s; "
        f"sampler impl {result['attention_impl']!r}")
  print(f"{'variant':58s} {'jax s/step':>10s} {'saving s':>9s} {'jax/hf':>7s} "
        f"{'meets target':>12s}")
  for label, v in result["variants"].items():
    print(f"{label:58s} {v['step_s']:10.3f} {v['saving_s']:9.3f} "
          f"{v['step_s'] / result['hf_step_s']:7.2f} "
          f"{'yes' if v['step_s'] <= result['target_s'] else 'no':>12s}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()

"""One process of the two-process loader test (tests/test_data_multihost.py).

Joins a 2-process jax.distributed job (gloo), builds the tiny shapes train iterator on the
global 'data' mesh, and writes for each of N batches the global image shape and this process's
image ids and unpadded sizes to a json file.
"""
import argparse
import json

BUCKETS = (48, 64, 80, 96, 112, 128)  # fine buckets, so the processes' own choices differ


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--cache_dir", required=True)
  parser.add_argument("--result", required=True)
  parser.add_argument("--num_batches", type=int, default=4)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator, num_processes=2, process_id=args.process_id)
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from ddetr_jax import data, sharding  # pylint: disable=g-import-not-at-top
  config = tiny.get_config("default")
  config.data.cache_dir = args.cache_dir
  config.train.global_batch_size = 4
  config.data.buckets = BUCKETS
  config.data.bucket_shape = "rect"  # heights and widths padded apart: agreed on apart too.
  iterator = data.make_train_iterator(config, mesh=sharding.make_mesh())
  batches = []
  for _ in range(args.num_batches):
    batch = next(iterator)
    batches.append(dict(global_shape=list(batch["images"].shape),
                        image_id=[int(i) for i in batch["image_id"]],
                        size=[[int(v) for v in s] for s in batch["size"]]))
  iterator.close()
  with open(args.result, "w") as f:
    json.dump(batches, f)


if __name__ == "__main__":
  main()

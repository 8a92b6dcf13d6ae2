"""Runs eval.py's `main` with TFDS `coco/2017` mocked (tfds_coco_mock), for test_evaluator_tfds.py.

  python -m tests.eval_tfds_worker [eval.py flags]     (from the repository root)

`mock_data` patches TFDS inside one process, so eval.py has to run in the process that enters
it: this one imports eval.py (defining its flags), then calls its `main` inside the mock.
"""
import importlib

from absl import app

from tests import tfds_coco_mock

eval_script = importlib.import_module("eval")  # the repository's eval.py.


def main(argv):
  with tfds_coco_mock.mock_coco():
    eval_script.main(argv)


if __name__ == "__main__":
  app.run(main)

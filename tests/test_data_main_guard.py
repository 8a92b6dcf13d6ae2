"""Data workers started from a script's unguarded top level: an error naming the line, not a hang."""
import os
import subprocess
import sys
import textwrap

import pytest

from ddetr_jax.data import main_guard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = textwrap.dedent('''\
    import os
    x = 1
    if __name__ == "__main__":
        y = 2
        if x:
            z = 3
    if "__main__" == __name__:
        w = 4
    if __name__ != "__main__":
        v = 5
    ''')


@pytest.mark.parametrize("line,guarded", [(1, False), (2, False), (4, True), (6, True),
                                          (8, True), (10, False)])
def test_is_guarded_knows_the_main_blocks(line, guarded):
  assert main_guard.is_guarded(SOURCE, line) == guarded


def test_a_call_from_a_function_or_a_test_is_not_refused():
  # Under pytest the main script is pytest's own (guarded) entry point, or none at all.
  main_guard.check_main_is_guarded("data.num_workers=2")


_SCRIPT = '''\
import sys
sys.path.insert(0, {repo!r})
from configs import tiny
from ddetr_jax import data

def batch_shape():
  config = tiny.get_config()
  config.data.cache_dir = {cache!r}
  config.data.num_workers = 2
  iterator = data.make_train_iterator(config)
  shape = next(iterator)["images"].shape
  iterator.close()
  return shape

{call}
'''


def _run(tmp_path, call: str) -> subprocess.CompletedProcess:
  script = tmp_path / "my_train.py"
  script.write_text(_SCRIPT.format(repo=REPO, cache=str(tmp_path / "cache"), call=call))
  return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300, cwd=tmp_path)


def test_unguarded_script_gets_an_error_naming_its_line(tmp_path):
  result = _run(tmp_path, "print(batch_shape())")
  assert result.returncode != 0
  assert "InvalidInputError" in result.stderr
  assert f"{tmp_path / 'my_train.py'}; its line 15" in result.stderr
  assert "data.num_workers=2 starts data worker processes" in result.stderr
  assert "data.num_workers=0" in result.stderr


def test_guarded_script_runs_its_workers(tmp_path):
  result = _run(tmp_path, 'if __name__ == "__main__":\n  print("shape", batch_shape())')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "shape (8, " in result.stdout

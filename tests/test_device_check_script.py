"""benchmarks/device_check.sh, the prepared GPU run: its wheel pins follow requirements.txt, its
step filter and logs work, and a bad subcommand is refused (run here on the CPU; the GPU steps
themselves only mean something on a GPU machine)."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def _pins(text: str) -> dict:
  return {m.group(1).lower().replace("_", "-"): m.group(2)
          for m in re.finditer(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"')]*)", text)}


def test_carried_wheels_pin_the_versions_of_requirements_txt():
  wheels = _pins(re.search(r"WHEELS=\((.*?)\)", SCRIPT.read_text(), re.S).group(1))
  required = _pins((ROOT / "requirements.txt").read_text())
  for name in ("flax", "optax", "orbax-checkpoint", "ml-collections", "pycocotools", "grain"):
    assert wheels[name] == required[name], name


def _run(tmp_path, *args, **env):
  (tmp_path / "no_wheels").mkdir(exist_ok=True)
  environ = dict(os.environ, OUT=str(tmp_path / "out"), WHEEL_DIR=str(tmp_path / "no_wheels"),
                 PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  environ.update(env)
  environ.pop("PYTHONPATH", None)
  return subprocess.run(["bash", str(SCRIPT), *args], env=environ, capture_output=True,
                        text=True, timeout=120, check=False)


def test_only_the_named_steps_run_and_log(tmp_path):
  result = _run(tmp_path, "run", STEPS="environment")
  assert result.returncode == 0, result.stdout + result.stderr
  assert sorted(os.listdir(tmp_path / "out")) == ["environment.log"]
  log = (tmp_path / "out" / "environment.log").read_text()
  assert re.search(r"^jax \d", log, re.M) and "auto impl:" in log
  assert "0 step(s) failed" in result.stdout


def _fake_python(tmp_path, script: str):
  """A PATH whose python3 is `script` (a /bin/sh body)."""
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "python3").write_text("#!/bin/sh\n" + script)
  (fake_bin / "python3").chmod(0o755)
  return f"{fake_bin}{os.pathsep}{os.environ['PATH']}"


def test_a_failing_step_counts_in_the_exit_status(tmp_path):
  # A python3 that imports the carried packages but fails at everything else: the step fails,
  # is logged, the next step still runs, and the exit status counts both failures.
  path = _fake_python(tmp_path, 'case "$*" in *"import ml_collections"*) exit 0;; esac\n'
                                "echo 'no python here' >&2\nexit 3\n")
  result = _run(tmp_path, "run", STEPS="pallas_tests,msda", PATH=path)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "=== pallas_tests: exit 3" in result.stdout and "=== msda: exit 3" in result.stdout
  assert "2 step(s) failed" in result.stdout
  assert "no python here" in (tmp_path / "out" / "msda.log").read_text()


def test_missing_packages_stop_the_run_naming_them(tmp_path):
  # Neither installed nor in the (empty) wheel folder: no step runs, the error says what to do.
  path = _fake_python(tmp_path, "exit 1\n")
  result = _run(tmp_path, "run", PATH=path)
  assert result.returncode == 2
  assert "ml_collections, pycocotools or grain" in result.stderr and "wheels" in result.stderr
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_unknown_step_name_is_refused(tmp_path):
  result = _run(tmp_path, "run", STEPS="environment,train_stpe")
  assert result.returncode == 2 and "'train_stpe'" in result.stderr
  assert not (tmp_path / "out").exists()


def test_unknown_subcommand_is_refused(tmp_path):
  result = _run(tmp_path, "bogus")
  assert result.returncode == 2 and "usage" in result.stderr

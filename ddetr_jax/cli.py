"""What train.py and eval.py share on the command line: config overrides, log level, user errors.

  check_config_overrides(argv, default_config)  call before `config_flags.DEFINE_config_file`
      (which applies the overrides while defining the flag when --config is not given): a
      --config file that does not exist, a variant its `get_config` refuses (`path.py:nope`),
      or an override `--config.a.b=V` naming no field of the config prints one line such as
      `error: --config.a.b: config.a has no field 'b'; did you mean --config.a.c?` and exits
      with status 2, where ml_collections would print a traceback.
  start_distributed(...)  jax.distributed.initialize from --distributed / --coordinator_address /
      --num_processes / --process_id, their mistakes as user errors.
  run(main)  absl's `app.run(main)`, after restarting with transparent huge pages where they
      apply (`host_malloc.reexec_with_huge_pages`), making CPU dispatch synchronous
      (`cpu_dispatch`) and turning XLA's Triton GEMM fusion off for GPUs (`xla_gpu_flags`),
      with two changes: absl and orbax log at WARNING (orbax logs every
      checkpoint save and restore at INFO) unless --verbosity is given (`--verbosity=0` shows
      them); and an `errors.UserError` is printed as `error: <message>` on stderr with exit
      status 2 and no traceback, as is a flag absl cannot parse (unknown flag, bad value,
      required flag left out; absl's own parser exits 1). Any other exception keeps its
      traceback.
"""
import difflib
import os
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections.config_flags import config_flags as ml_config_flags

from ddetr_jax import cpu_dispatch
from ddetr_jax import errors
from ddetr_jax import host_malloc
from ddetr_jax import xla_gpu_flags

USER_ERROR_EXIT_STATUS = 2


def _unknown_field(config: config_dict.ConfigDict, field_path: str) -> Optional[str]:
  """Why `field_path` ('train.num_train_steps') names no field of `config`, or None if it does.

  The message names the first missing key, where it was looked for, and up to 3 close matches
  (difflib), else that level's fields; a path going on below a value says so. Paths with an
  index (`a[0]`) are left to ml_collections (None).
  """
  node, walked = config, ["config"]
  for name in field_path.split("."):
    if "[" in name:
      return None
    if not isinstance(node, config_dict.ConfigDict):
      return (f"--config.{field_path}: {'.'.join(walked)} is a value ({type(node).__name__}), "
              f"not a section: it has no field {name!r}")
    if name not in node:
      where = ".".join(walked)
      fields = sorted(node.keys())
      close = difflib.get_close_matches(name, fields, n=3)
      hint = ("did you mean " + " or ".join(f"--{where}.{c}" for c in close) + "?" if close
              else f"its fields are {', '.join(fields)}")
      return f"--config.{field_path}: {where} has no field {name!r}; {hint}"
    node = node[name]
    walked.append(name)
  return None


def _config_argument(argv: Sequence[str], default: str) -> str:
  """The value of the last --config=V / --config V in argv, else `default`."""
  value = default
  for i, arg in enumerate(argv):
    match = re.fullmatch(r"--?config(=(.*))?", arg)
    if match and match.group(1):
      value = match.group(2)
    elif match and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def check_config_overrides(argv: Sequence[str], default_config: str) -> None:
  """Exits with status 2 and one line on stderr for a missing --config file or variant, or a
  --config.* override naming no config field.

  Args:
    argv: the command line (sys.argv); --flagfile arguments are expanded.
    default_config: the --config default (`path.py` or `path.py:variant`).

  A config file that fails for another reason (a bug in it), or a command line absl cannot
  read, is left to absl and ml_collections to report, with their traceback.
  """
  try:
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error:
    return
  spec = _config_argument(argv, default_config)
  path, _, variant = spec.partition(":")
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".py") and not f.startswith("_"))
    _exit_with_user_error(f"--config {spec}: {path!r} is a folder; name a config file in it"
                          + (f" ({', '.join(files[:8])})" if files else ""))
  if not os.path.isfile(path):
    _exit_with_user_error(f"--config {spec}: no such config file {path!r}"
                          + ("" if os.path.isabs(path) else f" (from {os.getcwd()})"))
  try:
    config = ml_config_flags.ConfigFileFlagParser(name="config", lock_config=False).parse(spec)
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections wraps what get_config raised (a KeyError it lets through as it is).
    cause = e.__cause__ or e.__context__ or e
    # (`path.py:` passes the empty variant '', which get_config refuses like any other.)
    named = variant in str(cause) if variant else "''" in str(cause)
    if ":" in spec and isinstance(cause, (ValueError, KeyError)) and named:
      reason = (f"get_config({variant!r}) raised KeyError {cause}" if isinstance(cause, KeyError)
                else cause.args[0] if cause.args else cause)
      _exit_with_user_error(f"--config {spec}: {reason}")
    return  # anything else (a bug in the config file) keeps ml_collections' traceback.
  if not isinstance(config, config_dict.ConfigDict):
    return
  overrides = [m.group(2) for m in (re.match(r"--?(no)?config\.([^=]+)", a) for a in argv) if m]
  for field_path in overrides:
    message = _unknown_field(config, field_path)
    if message:
      _exit_with_user_error(message)


def _exit_with_user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USER_ERROR_EXIT_STATUS)


def start_distributed(auto_detect: bool, coordinator_address: Optional[str],
                      num_processes: Optional[int], process_id: Optional[int]) -> None:
  """`jax.distributed.initialize` from the entry points' flags; their mistakes are user errors.

  --coordinator_address HOST:PORT needs --num_processes N and --process_id I (0 <= I < N);
  those two alone are refused (they would be ignored); --distributed alone auto-detects the
  cluster (TPU pods, SLURM, Open MPI), and JAX's refusal (no cluster found) is a user error too.
  Nothing given: a single process, nothing to do.
  """
  given = {"--num_processes": num_processes, "--process_id": process_id}
  if coordinator_address:
    missing = [name for name, value in given.items() if value is None]
    if missing:
      raise errors.InvalidInputError(
          f"--coordinator_address={coordinator_address} needs {' and '.join(missing)} too")
    if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}", coordinator_address):
      raise errors.InvalidInputError(
          f"--coordinator_address={coordinator_address!r}: expected HOST:PORT (e.g. 10.0.0.1:1234)")
    if not 0 <= process_id < num_processes:
      raise errors.InvalidInputError(
          f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  elif any(value is not None for value in given.values()):
    named = " and ".join(name for name, value in given.items() if value is not None)
    raise errors.InvalidInputError(
        f"{named} need --coordinator_address=HOST:PORT (or --distributed alone, to auto-detect "
        f"the cluster)")
  elif auto_detect:
    kwargs = {}
  else:
    return
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # JAX's own checks, e.g. --distributed where no cluster is detected.
    raise errors.InvalidInputError(f"jax.distributed.initialize: {e}") from e


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, quiet unless --verbosity is given, printing user errors as one line.

  First restarts the process with transparent huge pages for glibc's large blocks where that
  applies (`host_malloc.reexec_with_huge_pages`, opt-in: DDETR_JAX_HUGE_PAGES=1), then makes
  CPU dispatch synchronous (`cpu_dispatch`; DDETR_JAX_ASYNC_DISPATCH=1 keeps JAX's default)
  and turns XLA's Triton GEMM fusion off for GPUs (`xla_gpu_flags`; XLA aborted compiling the
  train step with it).
  """
  host_malloc.reexec_with_huge_pages()
  cpu_dispatch.use_synchronous_cpu_dispatch()
  xla_gpu_flags.disable_triton_gemm()

  def main_printing_user_errors(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except errors.UserError as e:
      sys.stdout.flush()
      print(f"error: {e}", file=sys.stderr)
      return USER_ERROR_EXIT_STATUS

  def parse_flags(argv):  # absl's own parser exits 1 after a 'FATAL Flags parsing error'.
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:  # unknown flag, bad value, a required flag left out.
      message = str(e)
      if "\n" in message:  # a config file that raised: ml_collections quotes its traceback,
        print(f"FATAL Flags parsing error:\n{message}", file=sys.stderr)  # a bug, not a
        sys.exit(1)                                                         # user error.
      print(f"error: {message} (--helpfull lists the flags)", file=sys.stderr)
      sys.exit(USER_ERROR_EXIT_STATUS)

  app.run(main_printing_user_errors, flags_parser=parse_flags)

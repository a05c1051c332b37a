"""What every command shares: flag parsing into a private flag table, logging, configs from dataclasses.

Each command defines its flags on a fresh `absl.flags.FlagValues` inside `main(argv)`, so commands can
be imported side by side (tests call several `main`s in one process) without clashing over absl's
global flag table, and `main` can be called with an explicit argv and returns an exit code.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from typing import Any, Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_dict

USAGE_ERROR = 2  # exit status of a command-line mistake (as argparse)


def parse(
  prog: str,
  doc: str,
  define: Callable[[flags.FlagValues, list[str]], None],
  argv: Sequence[str] | None,
) -> tuple[flags.FlagValues, list[str]]:
  """Defines the command's flags (`define(flag_values, full_argv)`) and parses `argv` into them.

  `argv` excludes the program name (default: `sys.argv[1:]`). Returns (flag values, positional
  arguments); read a flag as `flag_values.name` (a config flag gives its ConfigDict).
  `--help` prints the usage and exits 0; a bad flag prints what is wrong and exits `USAGE_ERROR`.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  full = [prog] + argv
  fv = flags.FlagValues()
  define(fv, full)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(doc.strip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
    raise SystemExit(0)
  try:
    rest = fv(full)
  except flags.Error as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR) from None
  return fv, rest[1:]


def define_policy_flags(fv: flags.FlagValues, *, dtype: str) -> None:
  """Flags of the commands that load a policy (`pgpo-eval`, `pgpo-inspect`): where it and its data are."""
  flags.DEFINE_string(
    "ckpt",
    None,
    "Checkpoint: WORKDIR, WORKDIR/checkpoints/<step>[/params], HF or converted folder.",
    flag_values=fv,
  )
  flags.mark_flag_as_required("ckpt", flag_values=fv)
  flags.DEFINE_string("dtype", dtype, "bfloat16 | float32.", flag_values=fv)
  flags.DEFINE_string(
    "mesh", "", "e.g. data=8 or data=2,tensor=4 (default: all devices on data).", flag_values=fv
  )
  flags.DEFINE_string(
    "processor", None, "Processor/tokenizer folder (default: next to the config).", flag_values=fv
  )
  flags.DEFINE_string("question_key", None, "Question column (default: detected).", flag_values=fv)
  flags.DEFINE_string("answer_key", None, "Answer column (default: detected).", flag_values=fv)
  flags.DEFINE_string(
    "image_key",
    None,
    "Image column(s), comma-separated for one image per column ('none': text-only on purpose; default: detected).",
    flag_values=fv,
  )
  flags.DEFINE_string("image_dir", None, "Base folder of relative image paths.", flag_values=fv)
  flags.DEFINE_bool("greedy", False, "Greedy decoding: k=1 at temperature 0.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
  flags.DEFINE_bool("no_progress", False, "No progress bars.", flag_values=fv)


def data_columns(fv: flags.FlagValues) -> dict[str, Any]:
  """The data-column flags of `define_policy_flags`, as keyword arguments of the data readers."""
  return dict(
    question_key=fv.question_key,
    answer_key=fv.answer_key,
    image_key=fv.image_key,
    image_dir=fv.image_dir,
  )


def load_policy(fv: flags.FlagValues, cfg: Any) -> Any:
  """The policy the flags of `define_policy_flags` name (`evaluation.load_policy`), with the pixel
  bounds of `cfg` (an `EvalConfig` or `InspectConfig`)."""
  from pgpo_jax import evaluation as ev

  return ev.load_policy(
    fv.ckpt,
    dtype=fv.dtype,
    mesh=ev.make_eval_mesh(fv.mesh),
    processor_dir=fv.processor,
    min_pixels=cfg.min_pixels,
    max_pixels=cfg.max_pixels,
  )


def define_distributed_flags(fv: flags.FlagValues) -> None:
  """Flags of the multi-host commands (`pgpo-train`, `pgpo-eval`): how the processes find each other."""
  flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "yes", "no"],
    "Call jax.distributed.initialize() (auto: on "
    "multi-host TPU environments, or when --coordinator_address is given).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for clusters that JAX does not "
    "detect (GPU hosts, N processes on one CPU machine).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (with --coordinator_address).", flag_values=fv
  )
  flags.DEFINE_integer(
    "process_id", None, "This process's index (with --coordinator_address).", flag_values=fv
  )


def maybe_initialize_distributed(fv: flags.FlagValues) -> None:
  """jax.distributed.initialize() when `--distributed` says so (auto: a coordinator or a multi-host TPU)."""
  import os

  from pgpo_jax import multihost

  if fv.distributed == "yes" or (
    fv.distributed == "auto"
    and (bool(fv.coordinator_address) or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
  ):
    multihost.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)


def setup_logging(
  level: int = logging.INFO, *, quiet: Sequence[str] = ("absl", "orbax", "grain", "jax")
) -> None:
  """INFO for our loggers on stderr with timestamps; the chattier libraries at WARNING."""
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for name in quiet:
    logging.getLogger(name).setLevel(logging.WARNING)


def config_from_dataclass(instance: Any) -> ml_collections.ConfigDict:
  """A ConfigDict of a (frozen) dataclass instance's fields, for `--config.field=value` overrides.

  A field whose value is None becomes a typed placeholder (from its annotation, e.g. `int | None`), so
  that the command line can set it; tuples stay tuples.
  """
  hints = typing.get_type_hints(type(instance))
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(instance):
    value = getattr(instance, f.name)
    if value is None:
      types = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
      value = config_dict.placeholder(types[0] if types else object)
    setattr(out, f.name, value)
  return out


def dataclass_from_config(cls: type, config: ml_collections.ConfigDict, **overrides: Any) -> Any:
  """`cls(**config, **overrides)`; lists (YAML-parsed tuples) become tuples again."""
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.to_dict().items()}
  return cls(**{**values, **overrides})

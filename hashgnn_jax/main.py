"""Command-line entry point: `python -m hashgnn_jax.main --config=configs/default.py --workdir=DIR`.

Kept short so that the logic lives in importable, tested modules: `train.loop` (train, then
evaluate), `experiment` (eval-mode restore) and `serving.export`.
"""

import logging as pylogging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from hashgnn_jax import distributed
from hashgnn_jax.evaluation import reporting
from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax import hostmem
from hashgnn_jax.serving import export
from hashgnn_jax.train import loop as train_loop

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"],
                  "train: train (resuming from the workdir) then evaluate; eval: restore and "
                  "evaluate only; export: restore and write every code for serving to "
                  "WORKDIR/export.")
flags.DEFINE_integer("step", None,
                     "With --mode=eval or export: the checkpoint step (default: latest).")
flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"],
                  "With --mode=eval or export: the latest checkpoint (or --step), or the best by "
                  "validation.")
flags.DEFINE_bool("reuse_host_memory", True,
                  "Where JAX runs on the CPU alone: set glibc's malloc to keep freed blocks for "
                  "reuse, so XLA:CPU does not fault in fresh buffers on every step "
                  "(hashgnn_jax/hostmem.py); up to "
                  f"{hostmem.DEFAULT_MAX_BLOCK_BYTES / 2**30:g} GiB of freed memory then stays "
                  "in the process. Not applied with an accelerator, where it is unmeasured.")
flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                  "Join a multi-process run with jax.distributed.initialize: on, off, or auto "
                  "(when --coordinator_address / JAX_COORDINATOR_ADDRESS is set or Slurm or Open "
                  "MPI started several processes); see hashgnn_jax/distributed.py.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0's coordination service (default: "
                    "JAX_COORDINATOR_ADDRESS, else detected by JAX on TPU pods and Slurm).")
flags.DEFINE_integer("num_processes", None,
                     "Processes in the run (default: JAX_NUM_PROCESSES, else detected).")
flags.DEFINE_integer("process_id", None,
                     "This process's index in [0, num_processes) (default: JAX_PROCESS_ID, else "
                     "detected).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "With several processes: after this long without news of a process, the "
                     "others stop with an error instead of waiting for it.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _DropOrbaxInfo(pylogging.Filter):
  """Orbax logs several INFO lines per save; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_DropOrbaxInfo())
  cpu_only = hostmem.jax_runs_on_cpu_only()
  if FLAGS.reuse_host_memory and cpu_only:
    # Before JAX's first call starts its threads: a thread keeps the malloc arena it first used.
    hostmem.reuse_freed_memory()
  distributed.initialize(FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                         heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
                         cpu_only=cpu_only)
  logging.info("%s", distributed.describe())
  if FLAGS.mode == "export":
    path = export.export_checkpoint(FLAGS.config, FLAGS.workdir, step=FLAGS.step,
                                    which=FLAGS.checkpoint)
    if path is not None:
      print(f"Export written to {path}")
    return
  if FLAGS.mode == "train":
    record = train_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    record = experiment_lib.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step,
                                                FLAGS.checkpoint)
  if "interrupted" in record:
    # A clean stop (exit status 0): the scheduler or the user asked for it, and the checkpoint
    # at the step reached is complete.
    print(f"Stopped by {record['interrupted']} at step {record['step']} of "
          f"{record['num_steps']}; rerun the same command to resume.")
    return
  if distributed.is_main():
    print(reporting.format_table(record))


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)

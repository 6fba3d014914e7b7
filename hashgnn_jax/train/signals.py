"""A stop request from SIGTERM or SIGINT, which the training loop honours between steps.

A preempted VM (or a scheduler's time limit) sends SIGTERM and waits a grace period before
killing; a step in flight finishes, the loop saves a checkpoint at the step it reached and
returns, and rerunning the command resumes from there. A second signal of the same kind gets its
previous handler back: Ctrl-C twice still interrupts at once.
"""

import signal

from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
  """Context manager: `.requested` names the first SIGTERM/SIGINT received inside it, or None."""

  def __init__(self):
    self.requested: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    logging.warning("%s received: stopping after the current step, with a checkpoint.", name)
    self.requested = self.requested or name
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def __enter__(self) -> "StopOnSignal":
    for signum in SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: signals stay as they are.
        pass
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False

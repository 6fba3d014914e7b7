r"""Trains several variants under one budget and writes the paper's Table 2 and Fig. 3 for them.

  python -m hashgnn_jax.compare --config=configs/gowalla.py --variants=paper,authors_code \
      --out=/tmp/gowalla_compare --config.data.path=/data/gowalla --config.train.num_epochs=10
  python -m hashgnn_jax.compare --config=configs/test.py --variants=paper --out=/tmp/studies \
      --studies=guidance,bits --config.eval.cutoffs='(10,50)'   # Fig. 7 (fixed p), Fig. 5c (K)

Each run is a subprocess of the training CLI,
`python -m hashgnn_jax.main --config=FILE:VARIANT --workdir=OUT/runs/NAME OVERRIDES` (with
`--config=FILE:MODIFIERS`, as configs/alibaba.py:synthetic, FILE:MODIFIERS,VARIANT), where
OVERRIDES are, in order: the runner's evaluation settings (`runner_overrides`, dropped for a key
the user sets), the user's `--config.*` arguments verbatim, then the run's own (a study's
setting, or `train.init_from` for a staged variant). config_flags applies them after
`get_config(VARIANT)`, so the shared budget wins over the variant.

A run is finished when OUT/runs/NAME/eval_results.json holds a test record; rerunning the same
command skips finished runs, and `hashgnn_jax.main` resumes an unfinished one from its latest
checkpoint. A failed run leaves the tail of its stderr in OUT/runs/NAME/error.txt and the others
still run (a staged variant whose prerequisite failed is not started). After each run, OUT gets:

  results.json            every run: variant, overrides, status, wall seconds, the test record's
                          step and checkpoint, the seed, the resolved config and
                          {protocol: {mode: {metric: value}}}; and the runner's command line
  table.md                Table 2's layout, one table per protocol and retrieval mode
  fig3_hamming_hr*.png    HR@n against n in Hamming space (standard; `_paper` for the paper
                          protocol); fig7_guidance.png and fig5c_bits.png for the studies
                          (figures need `pip install -e ".[plots]"`)
"""

import collections
import dataclasses
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hashgnn_jax import config_lib
from hashgnn_jax import fileio

FLAGS = flags.FLAGS

STUDIES = ("guidance", "bits")
GUIDANCE_PROBABILITIES = (1.0, 0.8, 0.6, 0.5, 0.4)  # Fig. 7's fixed p.
HASH_BITS = (16, 32, 64, 128)  # Fig. 5c's K.
RUNNER_CUTOFFS = (10, 20, 50, 100, 150, 200)  # Fig. 3's n.
EXTRA_CANDIDATES = (100,)  # Table 2's hierarchical M = 100, beside eval.num_candidates.
TABLE_CUTOFFS = (20, 50, 100)
STUDY_CUTOFF = 50  # Figs. 7 and 5c plot HR@50 (or the largest cutoff below it).
TABLE_MODES = ("hamming", "hierarchical", "continuous")  # hierarchical@M sits beside hierarchical.
ERROR_TAIL_LINES = 60

# An override as config_flags recognises one: -config.KEY, --config.KEY=VALUE, --noconfig.KEY.
_OVERRIDE = re.compile(r"^-{1,2}(?P<no>no)?config\.(?P<key>[^=]+)(?P<value>=.*)?$", re.DOTALL)

_VARIANTS = flags.DEFINE_list(
    "variants", None,
    f"Comma-separated variants to train, of config_lib.VARIANTS ({', '.join(config_lib.VARIANTS)}"
    "); a staged variant's prerequisite (config_lib.VARIANT_STAGES) is added and run first.")
_OUT = flags.DEFINE_string(
    "out", None, "Output folder: runs/NAME (each run's workdir), results.json, table.md, *.png.")
_STUDIES = flags.DEFINE_list(
    "studies", [],
    "Extra runs of each --study_variants variant: 'guidance' (fixed p in "
    f"{GUIDANCE_PROBABILITIES}, Fig. 7) and/or 'bits' (hash_bits K in {HASH_BITS}, Fig. 5c).")
_STUDY_VARIANTS = flags.DEFINE_list(
    "study_variants", ["paper"],
    "The variants the studies run (each a line of the study's figure), named VARIANT@p=P and "
    "VARIANT@bits=K. Staged variants (lsh, hashgnn_sp) have no studies.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each planned run's command and exit.")
config_flags.DEFINE_config_file(
    "config", None,
    "Configuration file, without ':variant'. Its --config.* overrides apply to every run.",
    lock_config=True)
flags.mark_flags_as_required(["config", "variants", "out"])


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the plan."""

  name: str  # Its folder under OUT/runs; the variant's name for a plain run.
  variant: str
  overrides: tuple[str, ...]  # Every --config.* argument the run gets, in order.
  own_overrides: tuple[str, ...] = ()  # The suffix of `overrides` that only this run has.
  prerequisite: str | None = None  # The run a staged variant initialises from.
  study: str | None = None  # One of STUDIES.
  study_value: float | None = None  # The study's fixed p or K.


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What became of a run: "finished", "failed", or "pending" (not reached yet)."""

  status: str
  wall_seconds: float | None = None  # Of the attempt that finished or failed it.
  error: str | None = None


# (a) Planning.


def override_key(argument: str) -> str:
  """The config key of an override argument: '--config.eval.cutoffs=(10,)' -> 'eval.cutoffs'."""
  match = _OVERRIDE.match(argument)
  if match is None:
    raise ValueError(f"{argument!r} is not a --config.KEY=VALUE override.")
  return match.group("key")


def extract_overrides(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
  """The --config.* arguments of a parsed command line, in order, as the user wrote them.

  A value given as the next argument ('--config.seed 3') is joined to its key with '=', so that
  each override is one argument; `flag_values` (already parsed) says which keys take no value.
  """
  overrides = []
  arguments = iter(argv)
  for argument in arguments:
    if argument == "--":
      break
    match = _OVERRIDE.match(argument)
    if match is None:
      continue
    if match.group("value") or match.group("no") or (
        flag_values[f"config.{match.group('key')}"].boolean):
      overrides.append(argument)
    else:
      overrides.append(f"{argument}={next(arguments)}")
  return overrides


def layer_overrides(defaults, overrides) -> tuple[str, ...]:
  """`defaults` less the keys that `overrides` set (or set a group of), then `overrides`.

  Dropping rather than shadowing: a repeated tuple override appends to the tuple instead of
  replacing it (`--config.eval.cutoffs=(10,20) --config.eval.cutoffs=(5,)` gives (10, 20, 5)).
  """
  keys = {override_key(argument) for argument in overrides}

  def shadowed(key):
    return any(key == k or key.startswith(k + ".") for k in keys)

  return tuple(a for a in defaults if not shadowed(override_key(a))) + tuple(overrides)


def runner_overrides() -> tuple[str, ...]:
  """The evaluation settings every run gets unless the user sets the same key."""
  return (f"--config.eval.cutoffs={_tuple_text(RUNNER_CUTOFFS)}",
          f"--config.eval.extra_candidates={_tuple_text(EXTRA_CANDIDATES)}")


def _tuple_text(values) -> str:
  return "(" + ",".join(str(v) for v in values) + ("," if len(values) == 1 else "") + ")"


def run_dir(out_dir: str, name: str) -> str:
  """A run's workdir."""
  return os.path.join(out_dir, "runs", name)


def plan_runs(variants, user_overrides, studies, out_dir: str,
              study_variants=("paper",)) -> list[Run]:
  """The runs to make, in order: each variant after its prerequisite, then the studies' runs
  of each of `study_variants`.

  Raises a ValueError naming an unknown variant or study and listing the known ones.
  """
  known = tuple(config_lib.VARIANTS)
  unknown = [v for v in (*variants, *(study_variants if studies else ())) if v not in known]
  if unknown:
    raise ValueError(f"Unknown variants {unknown}; known variants: {', '.join(known)}.")
  unknown = [s for s in studies if s not in STUDIES]
  if unknown:
    raise ValueError(f"Unknown studies {unknown}; known studies: {', '.join(STUDIES)}.")
  if not variants and not studies:
    raise ValueError("Nothing to run: give --variants (and/or --studies).")
  stages = config_lib.VARIANT_STAGES
  shared = layer_overrides(runner_overrides(), user_overrides)
  runs = {}

  def add(variant, dependants=()):
    if variant in runs:
      return
    if variant in dependants:
      raise ValueError(f"config_lib.VARIANT_STAGES has a cycle: {' <- '.join(dependants)}.")
    prerequisite = stages.get(variant)
    own = ()
    if prerequisite is not None:
      add(prerequisite, dependants + (variant,))
      own = (f"--config.train.init_from={run_dir(out_dir, prerequisite)}",)
    runs[variant] = Run(variant, variant, shared + own, own, prerequisite)

  def add_study(variant, study, value, name, own):
    runs[name] = Run(name, variant, shared + own, own, study=study, study_value=value)

  for variant in variants:
    add(variant)
  staged = [v for v in study_variants if v in stages] if studies else []
  if staged:
    raise ValueError(f"Staged variants {staged} have no studies (their stages would need one "
                     "prerequisite run per study value).")
  for variant in study_variants if studies else ():
    if "guidance" in studies:
      add(variant)  # Fig. 7's line for the variant's own schedule.
      for p in GUIDANCE_PROBABILITIES:
        add_study(variant, "guidance", p, f"{variant}@p={p:g}",
                  ("--config.guidance.schedule=constant", f"--config.guidance.init={p:g}",
                   f"--config.guidance.floor={p:g}"))
    if "bits" in studies:
      # K = 32 gets its own run even if 32 is the default: the user's overrides may set it.
      for bits in HASH_BITS:
        add_study(variant, "bits", bits, f"{variant}@bits={bits}",
                  (f"--config.model.hash_bits={bits}",))
  return list(runs.values())


def run_command(run: Run, config_file: str, out_dir: str) -> list[str]:
  """The training subprocess of a run."""
  return [sys.executable, "-m", "hashgnn_jax.main",
          f"--config={_with_variant(config_file, run.variant)}",
          f"--workdir={run_dir(out_dir, run.name)}", *run.overrides]


def _with_variant(config_file: str, variant: str) -> str:
  """FILE:VARIANT, or FILE:MODIFIERS,VARIANT for a `config_file` given as FILE:MODIFIERS."""
  return f"{config_file},{variant}" if ":" in config_file else f"{config_file}:{variant}"


def resolve_config(config_file: str, variant: str, overrides):
  """The ConfigDict that `hashgnn_jax.main` builds from `--config=FILE:VARIANT` and overrides.

  Raises an AttributeError naming a key the schema lacks, absl's flags.Error naming a value of
  the wrong type.
  """
  argv = ["hashgnn_jax.compare", f"--config={_with_variant(config_file, variant)}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


# (b) Running.


def read_test_record(directory: str) -> dict | None:
  """The run's eval_results.json if it holds a test record (the run finished), else None."""
  record = _read_json(os.path.join(directory, "eval_results.json"))
  return record if record is not None and record.get("split") == "test" else None


def _read_json(path: str) -> dict | None:
  """The JSON in `path`, or None if there is none (a missing or half-written file)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def execute_run(command: list[str], directory: str) -> Outcome:
  """Runs one training subprocess, its stdout and stderr appended to DIRECTORY/log.txt.

  Also writes DIRECTORY/runner.json (command, exit status, wall seconds) and, on failure,
  DIRECTORY/error.txt with the last ERROR_TAIL_LINES lines of stderr.
  """
  os.makedirs(directory, exist_ok=True)
  error_path = os.path.join(directory, "error.txt")
  tail = collections.deque(maxlen=ERROR_TAIL_LINES)
  start = time.monotonic()
  # Append mode (O_APPEND): the child writes its stdout to the same file while this process
  # copies stderr in, and an interrupted run's earlier attempts stay in the log.
  with open(os.path.join(directory, "log.txt"), "a", buffering=1) as log:
    log.write(f"# {_now()} {shlex.join(command)}\n")
    with subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE, text=True,
                          errors="replace") as process:
      for line in process.stderr:
        log.write(line)
        tail.append(line)
  wall_seconds = time.monotonic() - start
  returncode = process.returncode
  fileio.write_json_atomic(os.path.join(directory, "runner.json"),
                           {"command": command, "returncode": returncode,
                            "wall_seconds": wall_seconds})
  if returncode != 0:
    error = f"exit status {returncode}; the end of its stderr is in {error_path}"
  elif read_test_record(directory) is None:
    error = f"exit status 0 but no test record in {directory}/eval_results.json"
  else:
    if os.path.exists(error_path):
      os.remove(error_path)  # From an earlier failed attempt.
    return Outcome("finished", wall_seconds)
  fileio.write_text_atomic(error_path, "".join(tail))
  return Outcome("failed", wall_seconds, error)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{seconds:02d}s"
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def run_all(runs: list[Run], out_dir: str, command_fn, write_outputs) -> dict[str, Outcome]:
  """Makes every unfinished run in order; `write_outputs(outcomes)` after each and at the end.

  `command_fn(run)` gives a run's command line. Returns {run name: Outcome}.
  """
  outcomes = {run.name: Outcome("pending") for run in runs}
  unfinished = {run.name for run in runs if read_test_record(run_dir(out_dir, run.name)) is None}
  start = time.monotonic()
  finished_seconds = []  # Of the runs this call trained to the end, for the ETA.
  for i, run in enumerate(runs, start=1):
    label = f"[{i}/{len(runs)}] {run.name}"
    directory = run_dir(out_dir, run.name)
    command = command_fn(run)
    if run.name not in unfinished:
      previous = _read_json(os.path.join(directory, "runner.json")) or {}
      outcomes[run.name] = Outcome("finished", previous.get("wall_seconds"))
      logging.info("%s: already finished, skipped.", label)
      if previous.get("command", command)[1:] != command[1:]:
        logging.warning("%s: finished earlier with other arguments (in %s/runner.json); delete "
                        "that folder to train it again.", label, directory)
      continue
    if run.prerequisite is not None and outcomes[run.prerequisite].status != "finished":
      outcomes[run.name] = Outcome("failed", error=f"prerequisite {run.prerequisite} failed")
      logging.error("%s: not started, prerequisite %s failed.", label, run.prerequisite)
    else:
      remaining = sum(1 for r in runs[i - 1:] if r.name in unfinished)
      eta = "unknown"
      if finished_seconds:
        mean = sum(finished_seconds) / len(finished_seconds)
        eta = f"{_duration(mean * remaining)} ({remaining} runs at {_duration(mean)})"
      logging.info("%s: training, elapsed %s, ETA %s; log in %s/log.txt", label,
                   _duration(time.monotonic() - start), eta, directory)
      outcome = execute_run(command, directory)
      outcomes[run.name] = outcome
      if outcome.status == "finished":
        finished_seconds.append(outcome.wall_seconds)
        logging.info("%s: finished in %s.", label, _duration(outcome.wall_seconds))
      else:
        logging.error("%s: failed after %s: %s", label, _duration(outcome.wall_seconds),
                      outcome.error)
    if i < len(runs):
      write_outputs(outcomes)
  write_outputs(outcomes)
  return outcomes


# (c) Collecting.


def collect_results(runs: list[Run], outcomes: dict[str, Outcome], configs: dict[str, dict],
                    out_dir: str, header: dict) -> dict:
  """results.json's content: `header` (the runner's settings) plus one entry per run.

  `configs` maps a run's name to its resolved config as a dict.
  """
  entries = []
  for run in runs:
    outcome = outcomes[run.name]
    config = configs[run.name]
    entry = {
        "name": run.name,
        "variant": run.variant,
        "overrides": list(run.overrides),
        "own_overrides": list(run.own_overrides),
        "prerequisite": run.prerequisite,
        "study": run.study,
        "study_value": run.study_value,
        "status": outcome.status,
        "wall_seconds": outcome.wall_seconds,
        "workdir": run_dir(out_dir, run.name),
        "seed": config["seed"],
        "config": config,
    }
    if outcome.error is not None:
      entry["error"] = outcome.error
    record = read_test_record(run_dir(out_dir, run.name)) if outcome.status == "finished" else None
    if record is not None:
      entry.update(step=record["step"],
                   # Without validation the final state is tested: the latest checkpoint.
                   checkpoint=record.get("checkpoint", "latest"),
                   num_users=record.get("num_users"), num_items=record.get("num_items"),
                   num_eval_users=record.get("num_eval_users"),
                   metrics=record["by_protocol"])
    entries.append(entry)
  return {**header, "written": _now(), "runs": entries}


def write_outputs(out_dir: str, results: dict) -> None:
  """Replaces results.json, table.md and the figures in `out_dir`."""
  fileio.write_json_atomic(os.path.join(out_dir, "results.json"), results)
  fileio.write_text_atomic(os.path.join(out_dir, "table.md"), format_table(results))
  write_plots(results, out_dir)


# (d) Table 2.


def _cutoffs(metrics: dict) -> list[int]:
  """The n of every hr@n in a {metric: value} dict, ascending."""
  return sorted(int(name.split("@")[1]) for name in metrics if name.startswith("hr@"))


def _candidates_key(protocol: str) -> str:
  """The config.eval field holding M of the plain 'hierarchical' mode under a protocol."""
  return "paper_candidates" if protocol == "paper" else "num_candidates"


def _mode_order(mode: str, candidates: int):
  """Sort key: Hamming, hierarchical by ascending M, continuous, then any other mode."""
  base, _, m = mode.partition("@")
  if base not in TABLE_MODES:
    return (len(TABLE_MODES), 0, mode)
  return (TABLE_MODES.index(base), int(m) if m else candidates, mode)


def _mode_title(mode: str, protocol: str, candidates: int) -> str:
  base, _, m = mode.partition("@")
  if base != "hierarchical":
    return {"hamming": "Hamming"}.get(mode, mode)
  if m:
    return f"{mode}, M = {m}"
  return f"hierarchical, M = {candidates} (eval.{_candidates_key(protocol)})"


def format_table(results: dict) -> str:
  """table.md: per protocol and mode, rows = runs, columns = HR@n then NDCG@n; best in bold."""
  entries = results["runs"]
  finished = [e for e in entries if e["status"] == "finished"]
  shown = [e for e in entries if e["status"] != "pending"]
  first = (finished or entries)[0]
  data = first["config"]["data"]
  described = [f"kind={data['kind']}"] + [f"{k}={data[k]}" for k in ("path", "split") if data[k]]
  if "num_users" in first:
    described.append(f"{first['num_users']} users, {first['num_items']} items, "
                     f"{first['num_eval_users']} test users evaluated")
  overrides = " ".join(results["overrides"]) or "none"
  lines = [f"# Table 2: {results['config_file']}", "",
           f"Data: {', '.join(described)}. Overrides: `{overrides}`. Written {_now()}.", ""]
  protocols = []
  for entry in finished:
    protocols += [p for p in entry["metrics"] if p not in protocols]
  for protocol in sorted(protocols, key=lambda p: (p != "standard", p)):
    with_protocol = [e for e in finished if protocol in e["metrics"]]
    candidates = with_protocol[0]["config"]["eval"][_candidates_key(protocol)]
    modes = sorted({m for e in with_protocol for m in e["metrics"][protocol] if m != "popularity"},
                   key=lambda m: _mode_order(m, candidates))
    for mode in modes:
      present = sorted({n for e in with_protocol
                        for n in _cutoffs(e["metrics"][protocol].get(mode, {}))})
      cutoffs = [n for n in present if n in TABLE_CUTOFFS] or present
      names = [f"hr@{n}" for n in cutoffs] + [f"ndcg@{n}" for n in cutoffs]
      lines += [f"## {protocol} protocol, {_mode_title(mode, protocol, candidates)}", "",
                "| run | " + " | ".join(n.replace("hr", "HR").replace("ndcg", "NDCG")
                                       for n in names) + " |",
                "|---" * (len(names) + 1) + "|"]
      lines += _table_rows(shown, protocol, mode, names)
      lines.append("")
  lines += ["## Runs", ""]
  for entry in shown:
    if entry["status"] == "finished":
      wall = "" if entry["wall_seconds"] is None else f", {_duration(entry['wall_seconds'])}"
      state = f"step {entry['step']}, {entry['checkpoint']} checkpoint{wall}"
    else:
      state = f"failed: {entry['error']}"
    own = f"; `{' '.join(entry['own_overrides'])}`" if entry["own_overrides"] else ""
    lines.append(f"- {entry['name']} (variant {entry['variant']}, seed {entry['seed']}): "
                 f"{state}{own}")
  return "\n".join(lines) + "\n"


def _table_rows(entries, protocol, mode, names) -> list[str]:
  """Markdown rows of one table; the best value of each column (ties included) in bold."""
  def value(entry, name):
    if entry["status"] != "finished":
      return None
    return entry["metrics"].get(protocol, {}).get(mode, {}).get(name)

  best = {}
  for name in names:
    values = [v for e in entries if (v := value(e, name)) is not None]
    best[name] = f"{max(values):.4f}" if values else None
  rows = []
  for entry in entries:
    if entry["status"] != "finished":
      rows.append(f"| {entry['name']} | failed" + " |" * len(names))
      continue
    cells = []
    for name in names:
      v = value(entry, name)
      text = "–" if v is None else f"{v:.4f}"
      cells.append(f"**{text}**" if text == best[name] else text)
    rows.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
  return rows


# (e) Figures.


def write_plots(results: dict, out_dir: str) -> list[str]:
  """Writes Fig. 3 (and the studies' Figs. 7 and 5c where their runs exist); returns the paths."""
  try:
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('matplotlib is not installed, so no figures: pip install -e ".[plots]"')
    return []

  def new_axes(title, xlabel, ylabel):
    # An Agg canvas of its own, so no global pyplot state and no display are involved.
    fig = figure.Figure(figsize=(6.4, 4.4))
    backend_agg.FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax

  finished = [e for e in results["runs"] if e["status"] == "finished"]
  written = []
  for protocol, suffix in (("standard", ""), ("paper", "_paper")):
    lines = [(e["name"], e["metrics"][protocol]["hamming"]) for e in finished
             if e["study"] is None and "hamming" in e["metrics"].get(protocol, {})]
    if not lines:
      continue
    fig, ax = new_axes(f"Hamming space, {protocol} protocol", "n", "HR@n")
    for name, metrics in lines:
      cutoffs = _cutoffs(metrics)
      ax.plot(cutoffs, [metrics[f"hr@{n}"] for n in cutoffs], marker="o", label=name)
    ax.legend()
    written.append(_save_figure(fig, os.path.join(out_dir, f"fig3_hamming_hr{suffix}.png")))

  plain = {e["name"]: e for e in finished if e["study"] is None}
  for study, filename, xlabel in (("guidance", "fig7_guidance.png", "fixed p"),
                                  ("bits", "fig5c_bits.png", "hash bits K")):
    entries = [e for e in finished if e["study"] == study and "standard" in e["metrics"]]
    lines = {}  # variant -> [(study value, standard metrics)], one figure line per mode each.
    for e in entries:
      lines.setdefault(e["variant"], []).append((e["study_value"], e["metrics"]["standard"]))
    points = [point for values in lines.values() for point in values]
    if not points:
      continue
    # Modes every point has (eval.modes may leave one out).
    modes = [m for m in ("hierarchical", "hamming") if all(m in metrics for _, metrics in points)]
    if not modes:
      continue
    cutoffs = _cutoffs(points[0][1][modes[0]])
    cutoff = max([n for n in cutoffs if n <= STUDY_CUTOFF] or cutoffs[:1])
    metric = f"hr@{cutoff}"
    fig, ax = new_axes(f"{study} study, standard protocol", xlabel, f"HR@{cutoff}")
    for variant, values in lines.items():
      values.sort(key=lambda point: point[0])
      own_schedule = plain.get(variant, {}).get("metrics", {}).get("standard", {})
      for mode in modes:
        label = mode if len(lines) == 1 else f"{variant}, {mode}"
        line, = ax.plot([x for x, _ in values], [metrics[mode][metric] for _, metrics in values],
                        marker="o", label=label)
        if study == "guidance" and metric in own_schedule.get(mode, {}):
          ax.axhline(own_schedule[mode][metric], linestyle="--", color=line.get_color(),
                     label=f"{label}, its own schedule")
    if study == "bits":
      ax.set_xscale("log", base=2)
      ticks = sorted({x for x, _ in points})
      ax.set_xticks(ticks, [str(int(x)) for x in ticks])
    ax.legend()
    written.append(_save_figure(fig, os.path.join(out_dir, filename)))
  return written


def _save_figure(fig, path: str) -> str:
  fileio.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # FILE:MODIFIERS (configs/alibaba.py:synthetic) keeps the file's own modifiers in every run,
  # as FILE:MODIFIERS,VARIANT; only a file whose get_config reads such a list accepts them.
  config_file = FLAGS["config"].config_filename
  user_overrides = extract_overrides(FLAGS.read_flags_from_files(sys.argv[1:], force_gnu=False),
                                     FLAGS)
  out_dir = os.path.abspath(_OUT.value)
  try:
    runs = plan_runs(_VARIANTS.value, user_overrides, _STUDIES.value, out_dir,
                     _STUDY_VARIANTS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  configs = {}
  for run in runs:
    # The same parse as the run's own (a variant may lack what an override needs), before any
    # training starts.
    try:
      configs[run.name] = resolve_config(config_file, run.variant, run.overrides).to_dict()
    except (AttributeError, flags.Error, KeyError, TypeError, ValueError) as e:
      raise app.UsageError(f"Run {run.name}: {e}") from None

  def command_fn(run):
    return run_command(run, config_file, out_dir)

  if _DRY_RUN.value:
    for run in runs:
      print(shlex.join(command_fn(run)))
    return 0
  logging.info("%d runs: %s", len(runs), ", ".join(run.name for run in runs))
  os.makedirs(out_dir, exist_ok=True)
  header = {"command": [sys.executable, "-m", "hashgnn_jax.compare", *sys.argv[1:]],
            "config_file": config_file, "overrides": user_overrides,
            "variants": _VARIANTS.value, "studies": _STUDIES.value}
  outcomes = run_all(runs, out_dir, command_fn, lambda outcomes: write_outputs(
      out_dir, collect_results(runs, outcomes, configs, out_dir, header)))
  failed = [name for name, outcome in outcomes.items() if outcome.status != "finished"]
  logging.info("Results in %s (results.json, table.md).%s", out_dir,
               f" Failed: {', '.join(failed)}." if failed else "")
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(main)

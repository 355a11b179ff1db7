"""`forgelab sweep <file> --count N`: run a W&B sweep file with no W&B server.

The same file serves both ways of sweeping:
    wandb sweep configs/sweeps/x.yaml && wandb agent <sweep id>      # W&B's server picks the trials
    forgelab sweep configs/sweeps/x.yaml --count 8                   # this module picks them, locally
    forgelab sweep --best <entity>/<project>/<sweep id>              # best_config.yaml of a server sweep

Here the trials are chosen by W&B's own search engine (the `sweeps` package: grid, random, bayes; hyperband
early termination when the file has `early_terminate`), and each trial runs the file's `command:` exactly as
`wandb agent` would build it (`${args}` -> `--model.init_args.lr=0.001`, same formatting), in its own process
and its own run directory:

    runs/sweeps/<name>/
        sweep.json         the sweep's state: definition, seed, every trial (parameters, state, metric, exit code)
        sweep.yaml         the sweep file as it was when the sweep started
        trial-000/         a complete run directory (config.yaml, metrics.csv, checkpoints/, wandb/ ...)
                           plus output.log, the trial's console output
        compare/           the comparison table and plots, rewritten when the sweep ends
        best_config.yaml   the best trial's resolved config: `forgelab fit --config best_config.yaml` re-runs it

Every trial of a sweep is in one W&B group (the sweep's name; offline runs sync later with `wandb sync`).
The state is written atomically after every change, so a sweep killed at any point resumes where it stopped
when the same command is run again: an interrupted trial continues from its last checkpoint (or starts over
when it had none), then new trials follow. A failed trial is recorded as failed and the sweep goes on, as with
`wandb agent`; only when the first trials all fail does the sweep stop (the command itself is broken). A sweep
whose trials all failed exits non-zero; one with some failed trials exits 0 and names them in its last line.
`--parallel N` runs N trials at once (one per visible GPU, else one per CPU core), the search picking each next
trial when a slot frees.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as _dt
import fcntl
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from common.errors import ConfigError, ForgelabError
from common.experiment.compare import (
    SWEEP_STATE,
    compare_runs,
    display_key,
    load_sweep_dir,
    metric_goal,
    read_metrics_csv,
)
from common.experiment.env import RUN_DIR_ENV
from common.io import write_json, write_text

with warnings.catch_warnings():  # sweeps 0.3 declares a pydantic v1 config key; harmless
    warnings.simplefilter("ignore")
    import sweeps

POLL_SECONDS = 1.0  # how often a running trial's metrics are read (for hyperband) and its process checked
KILL_DELAY = 30.0  # seconds a trial gets to stop after SIGTERM/SIGINT before it is killed (wandb agent: 30)
MAX_INITIAL_FAILURES = 3  # the first trials all failing means the command is broken (wandb agent stops too)
TRIAL_JOB_TYPE = "sweep-trial"

# `wandb agent`'s default command; a file without `command:` runs `program` with the interpreter
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]

# trial states; the `sweeps` search sees stopped trials as finished ones (with their metric so far)
RUN_STATE = {
    "pending": "pending",
    "running": "running",
    "preempted": "preempted",
    "finished": "finished",
    "stopped": "finished",
    "failed": "failed",
}


# -- the sweep file ---------------------------------------------------------------------------------------------
def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Read and validate a sweep file against W&B's own schema (the one `wandb sweep` checks), plus the rules
    forgelab's CLI needs: `${args}` (with hyphens) after the subcommand and the config files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        definition = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file {path} is not valid YAML: {err}") from None
    if not isinstance(definition, dict):
        raise ConfigError(f"sweep file {path} must be a mapping (method, metric, parameters, command)")
    problems = validate_sweep_definition(definition)
    if problems:
        raise ConfigError(f"sweep file {path}: " + "; ".join(problems))
    return definition


def validate_sweep_definition(definition: dict[str, Any]) -> list[str]:
    """Schema violations (W&B's `sweeps` package) and forgelab-specific problems; empty when the file is fine."""
    try:
        problems = list(sweeps.schema_violations_from_proposed_config(definition))
    except ValueError as err:
        return [str(err)]
    if not problems:
        try:
            sweeps.SweepConfig(
                definition
            )  # also fills defaults; raises on what the schema alone lets through
        except Exception as err:  # jsonschema.ValidationError and the package's own ValueErrors
            problems.append(str(getattr(err, "message", err)))
    problems += _numbers_read_as_text(definition.get("parameters") or {})
    command = [str(c) for c in definition.get("command") or []]
    if "${args_no_hyphens}" in command:
        problems.append("`${args_no_hyphens}` gives `key=value`, which jsonargparse rejects: use `${args}`")
    if command and not any(c in ("${args}", "${args_json}", "${args_json_file}") for c in command):
        problems.append("`command:` has no `${args}`: the swept values would never reach the trial")
    if not command and not definition.get("program"):
        problems.append("give `command:` (e.g. [forgelab, fit, --config, <file>, ${args}]) or `program:`")
    return problems


def _numbers_read_as_text(parameters: dict[str, Any], prefix: str = "") -> list[str]:
    """`min: 1e-5` is the string "1e-5" to YAML 1.1 (PyYAML, and so wandb): say so instead of a schema riddle."""
    problems = []
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("parameters"), dict):
            problems += _numbers_read_as_text(spec["parameters"], f"{prefix}{name}.")
        for key in ("min", "max", "mu", "sigma", "q"):
            value = spec.get(key)
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
                mantissa, exponent = re.split("[eE]", value)
                fixed = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"
                problems.append(f"{prefix}{name}.{key} is the text '{value}' to YAML: write {fixed}")
    return problems


def sweep_name(definition: dict[str, Any], path: str | Path) -> str:
    name = str(definition.get("name") or Path(path).stem)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "sweep"


def forgelab_executable() -> list[str]:
    """The `forgelab` of this environment (the console script next to this Python, else `python -m`)."""
    script = shutil.which("forgelab", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "common.experiment.cli"]


def _args_macros(params: dict[str, Any]) -> dict[str, list[str]]:
    """`${args}`, `${args_json}` ... for these values, formatted by wandb agent's own function."""
    # no public wandb API expands a sweep command (wandb.agent needs a server); the agent itself calls this
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {key: {"value": value} for key, value in params.items()}})


def trial_command(
    definition: dict[str, Any], params: dict[str, Any], args_json_file: Path | None = None
) -> list[str]:
    """The command `wandb agent` would run for these parameter values (same macros, same `--key=value`), with
    `forgelab` resolved to this environment's and `${interpreter}` to this Python."""
    # no public wandb API expands a sweep command (wandb.agent needs a server); the agent itself calls this
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    template = create_sweep_command(copy.deepcopy(definition.get("command")) or list(DEFAULT_COMMAND))
    macros: dict[str, list[str]] = _args_macros(params)
    macros["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    macros["interpreter"] = [sys.executable]
    macros["program"] = [str(definition["program"])] if definition.get("program") else []
    if args_json_file is not None:
        macros["args_json_file"] = [str(args_json_file)]
    command: list[str] = []
    for token in map(str, template):
        if token.startswith("${") and token.endswith("}"):
            command += macros.get(token[2:-1]) or []
        else:
            command.append(token)
    if command and command[0] == "forgelab":
        command = forgelab_executable() + command[1:]
    elif len(command) > 1 and Path(command[0]).name == "env" and command[1] == "forgelab":
        command = forgelab_executable() + command[2:]
    return command


def is_forgelab_trainer_command(command: list[str]) -> bool:
    """Whether the command is `forgelab fit|validate|test ...` (it then takes forgelab's run options)."""
    for i, token in enumerate(command):
        if Path(token).name == "forgelab" or (
            token == "common.experiment.cli" and i > 0 and command[i - 1] == "-m"
        ):
            return i + 1 < len(command) and command[i + 1] in ("fit", "validate", "test")
    return False


def missing_config_files(command: list[str]) -> list[str]:
    """`--config <file>` arguments naming files that do not exist (relative to the current directory)."""
    missing = []
    for i, token in enumerate(command):
        value = None
        if token == "--config" and i + 1 < len(command):
            value = command[i + 1]
        elif token.startswith("--config="):
            value = token.split("=", 1)[1]
        if value and not Path(value).is_file():
            missing.append(value)
    return missing


TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def forgelab_arguments(command: list[str]) -> list[str] | None:
    """The arguments after `forgelab` (or `python -m common.experiment.cli`), or None for another program."""
    if command and Path(command[0]).name == "forgelab":
        return command[1:]
    if len(command) > 2 and command[1:3] == ["-m", "common.experiment.cli"]:
        return command[3:]
    return None


def check_trial_command(command: list[str]) -> str | None:
    """What would stop this trial before it trains, as one line (None when nothing does): a `forgelab fit|
    validate|test|predict` command is parsed by the CLI itself (`--print_config`, in this process: config files,
    keys, types and choices, as the trial's own parser checks them); another program must exist."""
    arguments = forgelab_arguments(command)
    if arguments is not None and arguments[:1] and arguments[0] in TRAINER_SUBCOMMANDS:
        problem = parse_with_cli([*arguments, "--print_config"])
        if problem and "does not exist" in problem:
            problem += (
                " (the command's paths are relative to the current directory: run from the repository root)"
            )
        return problem
    missing = missing_config_files(command)
    if missing:
        return (
            f"config files do not exist here: {', '.join(missing)} "
            "(the command's paths are relative to the current directory: run from the repository root)"
        )
    if arguments is None and command:
        if shutil.which(command[0]) is None:
            return f"{command[0]} is not a program on PATH"
        script = command[1] if len(command) > 1 else ""
        python = Path(command[0]).name.startswith("python")
        if python and script and not script.startswith("-") and not Path(script).is_file():
            return f"{script} does not exist (relative to the current directory)"
    return None


def parse_with_cli(arguments: list[str]) -> str | None:
    """Run `forgelab <arguments>` in this process, its output kept; the one-line error when it fails."""
    return run_forgelab(arguments)[0]


def run_forgelab(arguments: list[str], stderr: io.StringIO | None = None) -> tuple[str | None, str]:
    """`forgelab <arguments>` in this process: (the one-line error or None, what it printed on stdout). What it
    printed on stderr (and the traceback of an exception) goes to `stderr` when given."""
    from common.experiment.cli import main as forgelab_main

    out, err = io.StringIO(), stderr if stderr is not None else io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            forgelab_main(arguments)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            problem = one_line_cli_error(err.getvalue()) or f"the command exits with {exit_.code}"
            return problem, out.getvalue()
    except Exception as exc:  # the trial would crash on it the same way
        traceback.print_exc(file=err)
        return f"{type(exc).__name__}: {exc}".splitlines()[0], out.getvalue()
    return None, out.getvalue()


# lines of jsonargparse's union-type explanations that say nothing about the value given
_NOISE = ("Subtypes:", "Errors:", "Given value type:", "Does not validate against any of the Union subtypes")


def one_line_cli_error(stderr: str) -> str | None:
    """forgelab's or jsonargparse's error in one line: the offending key, what it expected, the value given."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^(forgelab: )?error:", line)]
    if not starts:
        return None
    parts: list[str] = []
    for line in [re.sub(r"^(forgelab: )?error:\s*", "", lines[starts[-1]]), *lines[starts[-1] + 1 :]]:
        text = line.strip().removeprefix("- ").strip()
        if not text or text.startswith(_NOISE) or "NoneType" in text or "NestedArg" in text:
            continue
        parts.append(text if not parts or parts[-1].endswith(":") else "; " + text)
    return re.sub(r"\s+", " ", " ".join(parts).replace(" ; ", "; "))[:500]


# -- state ------------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One trial of the sweep, as recorded in sweep.json."""

    index: int
    params: dict[str, Any]
    state: str = "pending"  # pending | running | finished | stopped | failed | preempted
    metric: float | None = None
    exit_code: int | None = None
    error: str | None = None
    pid: int | None = None
    attempts: int = 0
    started: str | None = None
    ended: str | None = None
    seconds: float = 0.0
    search_info: dict[str, Any] = field(default_factory=dict)
    devices: str | None = None  # CUDA_VISIBLE_DEVICES of its last attempt (--parallel on GPUs)

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"


@dataclass
class _Launch:
    """A trial's running process and what its end needs."""

    trial: Trial
    process: subprocess.Popen
    log: IO[bytes]
    log_path: Path
    start: float
    stop_sent: float | None = None  # when hyperband's SIGTERM went out


def visible_gpus() -> list[str]:
    """The GPUs trials may use: CUDA_VISIBLE_DEVICES when set (empty: none), else every GPU `nvidia-smi -L`
    lists (none without it; not imported from torch: the sweep process stays light)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = []
        for device in (d.strip() for d in visible.split(",")):
            if not device or device.startswith("-"):  # CUDA stops at the first invalid entry
                break
            devices.append(device)
        return devices
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    try:
        listed = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, _ in enumerate(line for line in listed.splitlines() if line.startswith("GPU "))]


def trial_slots(parallel: int) -> list[dict[str, str]]:
    """The environment each of `parallel` trials running at once gets on top of the sweep's: one GPU each
    (CUDA_VISIBLE_DEVICES) when GPUs are visible, else an equal share of the CPU cores (OMP_NUM_THREADS, unless
    set). One trial at a time changes nothing (a trial sees every GPU, e.g. for DDP)."""
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    if parallel == 1:
        return [{}]
    gpus = visible_gpus()
    if gpus:
        if parallel > len(gpus):
            raise ConfigError(
                f"--parallel {parallel} runs one trial per GPU, but {len(gpus)} GPU(s) are visible "
                f"({','.join(gpus)}): use --parallel {len(gpus)} or fewer"
            )
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus[:parallel]]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if parallel > cores:
        raise ConfigError(
            f"--parallel {parallel} runs one trial per CPU core with no GPU visible, but this process may use "
            f"{cores} CPU core(s): use --parallel {cores} or fewer"
        )
    threads = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(max(1, cores // parallel))}
    return [dict(threads) for _ in range(parallel)]


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """numpy scalars (bayes suggestions) -> Python values, so they format and serialise as wandb agent's do."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """In the trial process (Linux): get SIGTERM when the sweep process dies, so no trial outlives its sweep."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM reached the sweep process."""


class LocalSweep:
    """A sweep's directory, its state, and the loop that runs its trials one at a time."""

    def __init__(self, definition: dict[str, Any], directory: Path, sweep_file: str | Path, seed: int = 0):
        self.definition = definition
        self.directory = directory
        self.sweep_file = str(sweep_file)
        self.seed = seed
        self.name = directory.name
        self.trials: list[Trial] = []
        self.created = _now()
        self.invocations: list[dict[str, Any]] = []
        self._histories: dict[str, list[dict[str, float]]] = {}
        self.metric = (definition.get("metric") or {}).get("name")
        self.goal = (definition.get("metric") or {}).get("goal") or (
            metric_goal(self.metric) if self.metric else "minimize"
        )

    # -- state on disk ---------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.directory / SWEEP_STATE

    def load(self) -> None:
        """Continue an existing sweep: same definition required (a changed file is a new sweep)."""
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as err:
            raise ForgelabError(
                f"{self.state_path} is not valid JSON ({err}); it is only ever replaced whole"
            ) from None
        if state.get("definition") != json.loads(json.dumps(self.definition, default=str)):
            raise ConfigError(
                f"{self.directory} holds a sweep started from a different definition of {state.get('sweep_file')}; "
                "give this one another --name (or delete the old sweep directory)"
            )
        self.seed = int(state.get("seed", self.seed))
        self.created = state.get("created", self.created)
        self.invocations = list(state.get("invocations", []))
        self.trials = [Trial(**trial) for trial in state.get("trials", [])]

    def save(self) -> None:
        write_json(
            self.state_path,
            {
                "name": self.name,
                "sweep_file": self.sweep_file,
                "method": self.definition.get("method"),
                "metric": {"name": self.metric, "goal": self.goal} if self.metric else None,
                "parameters": list((self.definition.get("parameters") or {}).keys()),
                "seed": self.seed,
                "created": self.created,
                "invocations": self.invocations,
                "definition": self.definition,
                "trials": [asdict(trial) for trial in self.trials],
            },
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One sweep process per sweep directory (the lock goes away with the process, however it ends)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = open(self.directory / ".lock", "a+")  # noqa: SIM115 -- held for the whole sweep
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ForgelabError(
                f"sweep {self.directory} is being run by another process; wait for it or stop it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    # -- the search ------------------------------------------------------------------------------------------
    def metric_history(self, trial: Trial) -> list[dict[str, float]]:
        """The sweep metric's values logged by a trial so far (its metrics.csv), as `sweeps` wants them."""
        if not self.metric:
            return []
        if trial.name in self._histories:
            return self._histories[trial.name]
        rows = read_metrics_csv(self.directory / trial.name / "metrics.csv")
        history = [{self.metric: row[self.metric]} for row in rows if self.metric in row]
        if trial.state in ("finished", "stopped", "failed"):  # ended trials' files no longer change
            self._histories[trial.name] = history
        return history

    def sweep_runs(self) -> list[Any]:
        """The trials as `sweeps.SweepRun`s (what W&B's server would hand its search engine)."""
        runs = []
        for trial in self.trials:
            history = self.metric_history(trial)
            runs.append(
                sweeps.SweepRun(
                    name=trial.name,
                    state=RUN_STATE[trial.state],
                    config={key: {"value": value} for key, value in trial.params.items()},
                    history=history,
                    summary_metrics=dict(history[-1]) if history else {},
                    stopped=trial.state == "stopped",
                )
            )
        return runs

    def suggest(self, index: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """W&B's search engine's next point, or None when a grid is exhausted. Seeded per trial, so a sweep
        restarted from scratch with the same seed proposes the same trials."""
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(self.seed * 100_003 + index)
        np.random.seed((self.seed * 100_003 + index) % 2**32)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = sweeps.next_run(self.definition, self.sweep_runs())
        except ValueError as err:
            raise ConfigError(f"the sweep's search failed: {err}") from None
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        if run is None:
            return None
        params = {key: _plain(value["value"]) for key, value in run.config.items()}
        info = _plain(run.search_info or {})
        info = {k: v for k, v in info.items() if isinstance(v, (int, float, str)) and k != "warnings"}
        return params, info

    def should_stop_early(self, trial: Trial) -> bool:
        """Hyperband (the `sweeps` package's) on the running trial's metric history so far."""
        if "early_terminate" not in self.definition or not self.metric:
            return False
        runs = self.sweep_runs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            to_stop = sweeps.stop_runs(self.definition, runs)
        return any(run.name == trial.name for run in to_stop)

    def dry_run_trials(self, limit: int | None) -> list[Trial]:
        """The trials a dry run parses: every grid point (up to the limit); for random and bayes search, enough
        of the search's first suggestions that every value of every `values:` list is given to one of them."""
        if self.definition.get("method") == "grid":
            trials: list[Trial] = []
            while limit is None or len(trials) < limit:
                probe = LocalSweep(self.definition, self.directory, self.sweep_file, self.seed)
                probe.trials = trials
                suggestion = probe.suggest(len(trials))
                if suggestion is None:
                    break
                trials.append(Trial(index=len(trials), params=suggestion[0]))
            return trials
        parameters = self.definition.get("parameters") or {}
        listed = {
            k: spec["values"] for k, spec in parameters.items() if isinstance(spec, dict) and "values" in spec
        }
        count = max([1, *(len(values) for values in listed.values())])
        trials = []
        for index in range(count if limit is None else min(count, limit)):
            suggestion = self.suggest(index)
            params = dict(suggestion[0]) if suggestion else {}
            for key, values in listed.items():
                params[key] = _plain(values[index % len(values)])
            trials.append(Trial(index=index, params=params))
        return trials

    # -- running trials --------------------------------------------------------------------------------------
    def trial_limit(self, count: int | None) -> int | None:
        cap = self.definition.get("run_cap")
        limits = [n for n in (count, cap) if n]
        if limits:
            return min(limits)
        if self.definition.get("method") == "grid":
            return None  # until the grid is exhausted
        raise ConfigError(
            "random and bayes sweeps never end by themselves: give --count N (or run_cap in the file)"
        )

    def run(self, count: int | None, slots: list[dict[str, str]] | None = None) -> None:
        """Run trials until the limit (or the grid's end): one per slot at a time (`trial_slots`), each started
        as soon as a slot is free with the search's next suggestion given every trial so far, running ones
        included (as W&B's server does for several agents)."""
        slots = slots or [{}]
        limit = self.trial_limit(count)
        self.invocations.append({"at": _now(), "count": count, "parallel": len(slots), "argv": sys.argv})
        self.save()
        self._print_header(limit, len(slots))
        running: dict[int, _Launch] = {}  # slot -> the trial running in it
        no_more = False
        try:
            while True:
                for slot, extra_env in enumerate(slots):
                    if slot in running or no_more:
                        continue
                    trial = self._next_trial(limit, running)
                    if trial is None:
                        no_more = True
                    else:
                        self._launch(trial, slot, extra_env, limit, running)
                        self._check_initial_failures()  # a trial that could not even start
                if running:
                    self._poll(running)
                elif no_more:
                    break
        except BaseException:  # Ctrl-C, SIGTERM, the first trials all failing: stop what runs, resumable
            self._stop_all(running)
            raise

    def _next_trial(self, limit: int | None, running: dict[int, _Launch]) -> Trial | None:
        """An interrupted trial first (pre-empted, or left running by a killed sweep process), else a new
        suggestion; None when the limit is reached or the grid is exhausted."""
        active = {launch.trial.index for launch in running.values()}
        for trial in self.trials:
            if trial.state in ("pending", "preempted", "running") and trial.index not in active:
                if trial.state == "running" and _pid_alive(trial.pid):
                    self._wait_for_orphan(trial)
                return trial
        if limit is not None and len(self.trials) >= limit:
            return None
        suggestion = self.suggest(len(self.trials))
        if suggestion is None:
            print(f"sweep {self.name}: the grid is exhausted after {len(self.trials)} trials", flush=True)
            return None
        trial = Trial(index=len(self.trials), params=suggestion[0], search_info=suggestion[1])
        self.trials.append(trial)
        self.save()  # suggested before started: a crash now does not lose or repeat the suggestion
        return trial

    def _print_header(self, limit: int | None, parallel: int = 1) -> None:
        done = sum(t.state in ("finished", "stopped", "failed") for t in self.trials)
        metric = f"{self.metric} ({self.goal})" if self.metric else "no metric"
        total = f"{limit} trials" if limit else "until the grid is exhausted"
        resumed = f", resuming after {done} done" if self.trials else ""
        at_once = f", {parallel} at a time" if parallel > 1 else ""
        print(
            f"sweep {self.name}: {self.definition.get('method')} search on {metric}, {total}{at_once}{resumed}; "
            f"state in {self.state_path}",
            flush=True,
        )

    def _check_initial_failures(self) -> None:
        ended = [t for t in self.trials if t.state in ("finished", "stopped", "failed")]
        if len(ended) >= MAX_INITIAL_FAILURES and all(t.state == "failed" for t in ended):
            last = ended[-1]
            raise ForgelabError(
                f"the first {len(ended)} trials of sweep {self.name} all failed (last: {last.error or 'see log'}); "
                f"see {self.directory / last.name / 'output.log'}"
            )

    def _prepare_trial_dir(self, trial: Trial) -> list[str]:
        """Extra arguments for (re)starting this trial: resume from its last checkpoint when it has one,
        otherwise clear what an interrupted attempt left (keeping its log)."""
        trial_dir = self.directory / trial.name
        command_is_forgelab = is_forgelab_trainer_command(self.command_for(trial))
        last = trial_dir / "checkpoints" / "last.ckpt"
        if trial.attempts and command_is_forgelab and last.is_file():
            return [f"--ckpt_path={last.resolve()}"]
        if trial.attempts and trial_dir.is_dir():
            for entry in trial_dir.iterdir():
                if entry.name != "output.log":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return []

    def command_for(self, trial: Trial) -> list[str]:
        trial_dir = self.directory / trial.name
        command = trial_command(self.definition, trial.params, args_json_file=trial_dir / "args.json")
        if is_forgelab_trainer_command(command):
            command += [f"--run.group={self.name}", f"--run.job_type={TRIAL_JOB_TYPE}"]
        return command

    def _launch(
        self,
        trial: Trial,
        slot: int,
        extra_env: dict[str, str],
        limit: int | None,
        running: dict[int, _Launch],
    ) -> None:
        """Start the trial's process in this slot (its GPU or CPU share); recorded in `running` at once."""
        trial_dir = self.directory / trial.name
        resume_args = self._prepare_trial_dir(trial)
        command = self.command_for(trial) + resume_args
        trial_dir.mkdir(parents=True, exist_ok=True)
        write_json(trial_dir / "args.json", trial.params)
        env = dict(os.environ) | extra_env
        env[RUN_DIR_ENV] = str(trial_dir.resolve())
        position = f"[{trial.index + 1}/{limit}]" if limit else f"[{trial.index + 1}]"
        values = " ".join(f"{display_key(k)}={_format_value(v)}" for k, v in trial.params.items())
        again = (
            " (resuming from its last checkpoint)" if resume_args else " (again)" if trial.attempts else ""
        )
        device = extra_env.get("CUDA_VISIBLE_DEVICES")
        where = f" on GPU {device}" if device else ""
        print(f"{position} {trial.name}{again}{where}: {values}", flush=True)
        log_path = trial_dir / "output.log"
        trial.attempts += 1
        trial.started = trial.started or _now()
        trial.devices = device
        log = open(log_path, "ab")  # noqa: SIM115 -- open while the trial runs; closed by _end/_stop_all
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # the trial's process group: its workers and DDP ranks end with it
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except OSError as err:  # no such program, not executable: the trial fails, as a crash would
            log.write(f"cannot start {command[0]}: {err}\n".encode())
            log.close()
            trial.state, trial.error, trial.ended = "failed", f"cannot start {command[0]}: {err}", _now()
            print(f"    {trial.name}: failed: {trial.error}", flush=True)
            self.save()
            return
        running[slot] = _Launch(trial, process, log, log_path, time.monotonic())
        trial.state, trial.pid = "running", process.pid
        self.save()

    def _poll(self, running: dict[int, _Launch]) -> None:
        """Wait up to POLL_SECONDS for a trial to end; end the ones that did, stop the ones hyperband drops."""
        first = next(iter(running.values()))
        with contextlib.suppress(subprocess.TimeoutExpired):
            first.process.wait(timeout=POLL_SECONDS)
        for slot, launch in list(running.items()):
            exit_code = launch.process.poll()
            if exit_code is None:
                if launch.stop_sent is None and self.should_stop_early(launch.trial):
                    print(f"    {launch.trial.name}: stopped early by hyperband", flush=True)
                    launch.process.send_signal(signal.SIGTERM)  # as wandb agent: Lightning stops at a batch
                    launch.stop_sent = time.monotonic()
                elif launch.stop_sent is not None and time.monotonic() - launch.stop_sent > KILL_DELAY:
                    _kill_group(launch.process)
                continue
            del running[slot]
            self._end(launch, exit_code)
            self._check_initial_failures()

    def _end(self, launch: _Launch, exit_code: int) -> None:
        trial = launch.trial
        _kill_group(launch.process)  # workers or DDP ranks the trial left behind go with it
        launch.log.close()
        trial.seconds += time.monotonic() - launch.start
        trial.exit_code, trial.pid, trial.ended = exit_code, None, _now()
        self._finish(trial, exit_code, launch.stop_sent is not None, launch.log_path)
        self.save()

    def _stop_all(self, running: dict[int, _Launch]) -> None:
        """Stop the running trials the way a terminal would (Ctrl-C reaches Lightning, which saves and exits),
        within KILL_DELAY in all, and record them as pre-empted: the next run of the sweep resumes them."""
        for launch in running.values():
            with contextlib.suppress(ProcessLookupError):
                launch.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + KILL_DELAY
        for launch in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                launch.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            _kill_group(launch.process)
            launch.log.close()
            launch.trial.state, launch.trial.pid = "preempted", None
            launch.trial.seconds += time.monotonic() - launch.start
        running.clear()
        self.save()

    def _wait_for_orphan(self, trial: Trial) -> None:
        """A trial still running from a sweep process that was killed: it was told to stop; give it time."""
        print(
            f"waiting for {trial.name} (pid {trial.pid}) left by an interrupted sweep process to end",
            flush=True,
        )
        deadline = time.monotonic() + KILL_DELAY
        while _pid_alive(trial.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _pid_alive(trial.pid):
            raise ForgelabError(
                f"{trial.name} of sweep {self.name} is still running as pid {trial.pid}; stop it, then run again"
            )

    def _finish(self, trial: Trial, exit_code: int, stopped: bool, log_path: Path) -> None:
        history = read_metrics_csv(self.directory / trial.name / "metrics.csv")
        values = [row[self.metric] for row in history if self.metric and self.metric in row]
        if values:
            trial.metric = min(values) if self.goal == "minimize" else max(values)
        if stopped:
            trial.state = "stopped"
        elif exit_code == 0:
            trial.state = "finished"
        else:
            trial.state = "failed"
            trial.error = _last_error_line(log_path)
        seconds = f"{trial.seconds:.0f} s"
        if trial.state == "failed":
            print(f"    {trial.name}: failed (exit {exit_code}) in {seconds}: {trial.error}", flush=True)
            print(f"    log: {log_path}", flush=True)
            return
        if self.metric and trial.metric is None:
            print(
                f"    {trial.name}: {trial.state} in {seconds}, but never logged '{self.metric}' "
                f"(logged: {', '.join(sorted({k for row in history for k in row})) or 'nothing'})",
                flush=True,
            )
            return
        best = self.best_trial()
        note = " (best so far)" if best is trial else ""
        metric = f": {self.metric} {trial.metric:.4g}{note}" if self.metric else ""
        print(f"    {trial.name}: {trial.state} in {seconds}{metric}", flush=True)

    def report_failures(self) -> None:
        """The sweep's outcome in its exit code: trials all failed is an error (there is no result); some failed
        is a result with a warning, the last line of the output naming the failed trials."""
        ended = [t for t in self.trials if t.state in ("finished", "stopped", "failed")]
        failed = [t for t in ended if t.state == "failed"]
        if not failed:
            return
        if len(failed) == len(ended):
            last = failed[-1]
            which = f"all {len(ended)} trials" if len(ended) > 1 else "the only trial"
            raise ForgelabError(
                f"{which} of sweep {self.name} failed (last: {last.error or 'see its log'}); "
                f"see {self.directory / last.name / 'output.log'}"
            )
        names = ", ".join(t.name for t in failed)
        print(
            f"sweep {self.name}: {len(failed)} of {len(ended)} trials failed ({names}); "
            f"their logs: {self.directory}/<trial>/output.log",
            flush=True,
        )

    def best_trial(self) -> Trial | None:
        scored = [t for t in self.trials if t.metric is not None and t.state in ("finished", "stopped")]
        if not scored:
            return None
        return (min if self.goal == "minimize" else max)(scored, key=lambda t: t.metric)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _last_error_line(log_path: Path) -> str:
    """The trial's own error (forgelab's one-line errors, else the last traceback line)."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    for line in reversed(lines):
        if line.startswith("forgelab: error:"):
            return line.removeprefix("forgelab: error:").strip()
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


@contextlib.contextmanager
def _interrupts_as_exception() -> Iterator[None]:
    """Ctrl-C and SIGTERM (a scheduler's pre-emption) end the sweep cleanly between two state writes."""

    def handler(signum: int, frame: Any) -> None:
        raise SweepInterrupted(signal.Signals(signum).name)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- command line -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgelab sweep",
        description="Run a W&B sweep file with no W&B server: W&B's search engine picks each trial, each trial is "
        "a full run of the file's command in its own process and run directory; re-run the same command to "
        "resume an interrupted sweep.",
    )
    parser.add_argument(
        "sweep_file",
        nargs="?",
        help="a sweep file in W&B's schema, e.g. configs/sweeps/classifier_tiny.yaml",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        help="total number of trials of the sweep (trials done before an interruption count; raise it to extend "
        "a finished sweep; never more than run_cap). Default: run_cap of the file, or the whole grid",
    )
    parser.add_argument(
        "--name", default=None, help="sweep name and directory (default: the file's name: field)"
    )
    parser.add_argument(
        "--root", default="runs", help="the sweep goes to <root>/sweeps/<name>/ (default: runs)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of a new sweep's random and bayes suggestions (a resumed sweep keeps its own)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="run N trials at once: one per GPU when GPUs are visible (CUDA_VISIBLE_DEVICES per trial), else one "
        "per CPU core (OMP_NUM_THREADS = cores / N); the search picks each next trial as a slot frees. Default 1",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the file, print the trials' commands and parse each with the CLI as its trial would "
        "(every grid point; every listed value of a random/bayes search); run nothing",
    )
    parser.add_argument(
        "--best",
        default=None,
        metavar="SWEEP",
        help="write best_config.yaml (the best trial's complete config) and print the command that re-runs it, "
        "for a sweep directory (runs/sweeps/<name>; a sweep does it when it ends) or a sweep of W&B's server "
        "(<entity>/<project>/<sweep id>, online: the best run by the sweep's metric)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="with --best: where to write (default: <sweep dir>/best_config.yaml, for a W&B sweep "
        "<root>/sweeps/<sweep id>/best_config.yaml)",
    )
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.best:
        if args.sweep_file:
            raise ConfigError("give a sweep file to run, or --best <sweep> (not both)")
        write_best(args.best, Path(args.root), Path(args.out) if args.out else None)
        return
    if not args.sweep_file:
        raise ConfigError("give a sweep file, e.g. forgelab sweep configs/sweeps/classifier_tiny.yaml")
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    definition = load_sweep_file(args.sweep_file)
    name = (
        re.sub(r"[^A-Za-z0-9_.-]+", "-", args.name) if args.name else sweep_name(definition, args.sweep_file)
    )
    directory = Path(args.root) / "sweeps" / name
    sweep = LocalSweep(definition, directory, args.sweep_file, seed=args.seed)
    slots = trial_slots(args.parallel)
    if args.dry_run:
        dry_run(sweep, args.count)
        return
    command = trial_command(definition, {})
    missing = missing_config_files(command)
    if missing:
        raise ConfigError(
            f"the sweep's command names config files that do not exist here: {', '.join(missing)}; "
            "run forgelab sweep from the repository root (the command's paths are relative to it)"
        )
    with sweep.locked():
        if sweep.state_path.is_file():
            sweep.load()
        else:
            write_text(directory / "sweep.yaml", Path(args.sweep_file).read_text())
        try:
            with _interrupts_as_exception():
                sweep.run(args.count, slots)
        except SweepInterrupted as signal_name:
            done = sum(t.state in ("finished", "stopped", "failed") for t in sweep.trials)
            print(
                f"sweep {sweep.name} interrupted ({signal_name}) after {done} trial(s); "
                f"run the same command to resume: forgelab sweep {args.sweep_file}"
                + (f" --name {args.name}" if args.name else "")
                + (f" --root {args.root}" if args.root != "runs" else "")
                + (f" --count {args.count}" if args.count else "")
                + (f" --parallel {args.parallel}" if args.parallel > 1 else ""),
                file=sys.stderr,
            )
            raise SystemExit(130) from None
        finally:
            if any(t.state in ("finished", "stopped") for t in sweep.trials):
                _write_comparison(sweep)
        sweep.report_failures()


# -- the best trial as a config of its own -----------------------------------------------------------------------
BEST_CONFIG = "best_config.yaml"


def best_config_text(config: dict[str, Any], source: str, subcommand: str = "fit") -> str:
    """A trial's resolved config as a new run of the same thing: its own run name, no checkpoint to resume
    from, job type `train` (the group, the sweep's name, stays: the re-run sits next to its sweep)."""
    config = copy.deepcopy(config)
    if isinstance(config.get("run"), dict):
        config["run"] = config["run"] | {"name": None, "job_type": "train"}
    if "ckpt_path" in config:
        config["ckpt_path"] = None
    header = f"# {source}\n# re-run it: forgelab {subcommand} --config <this file>\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def write_local_best(sweep: LocalSweep, out: Path | None = None) -> Path | None:
    """<sweep>/best_config.yaml from the best trial's config.yaml, and the command that re-runs it (for a
    command that is not `forgelab fit ...`, the trial's command itself)."""
    best = sweep.best_trial()
    if best is None:
        return None
    arguments = forgelab_arguments(sweep.command_for(best)) or []
    config_path = sweep.directory / best.name / "config.yaml"
    if not (arguments[:1] and arguments[0] in TRAINER_SUBCOMMANDS and config_path.is_file()):
        print(f"re-run it: {' '.join(trial_command(sweep.definition, best.params))}", flush=True)
        return None
    out = out or sweep.directory / BEST_CONFIG
    metric = f", {sweep.metric} {best.metric:.4g}" if sweep.metric and best.metric is not None else ""
    source = (
        f"the resolved config of {best.name}, the best trial of sweep {sweep.name}{metric} ({config_path})"
    )
    write_text(out, best_config_text(yaml.safe_load(config_path.read_text()), source, arguments[0]))
    print(f"re-run it: forgelab {arguments[0]} --config {out}", flush=True)
    return out


def find_run_dir(root: Path, wandb_id: str) -> Path | None:
    """The run directory below `root` whose run.json records this W&B run id."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("wandb", "checkpoints", "plots", "compare"))
        if "run.json" in files:
            subdirs.clear()
            with contextlib.suppress(OSError, json.JSONDecodeError):
                if json.loads((Path(directory) / "run.json").read_text()).get("wandb_id") == wandb_id:
                    return Path(directory)
    return None


def _unwrapped(value: Any) -> Any:
    """A W&B config value, `{"value": v, "desc": ...}` or plain."""
    return value["value"] if isinstance(value, dict) and "value" in value else value


def best_from_wandb(path: str, root: Path, out: Path | None = None) -> Path:
    """best_config.yaml for a sweep of W&B's server, from `wandb.Api().sweep(path).best_run()` (ranked by the
    sweep's metric on the server): the best run's own config.yaml when its run directory is below `root` (the
    agent ran it here), else the sweep's command with the run's swept values, resolved by the CLI's parser."""
    import wandb

    try:
        remote = wandb.Api().sweep(path)
        definition = dict(remote.config)
        best = remote.best_run()
    except Exception as err:  # wandb's CommError/ValueError: offline, not logged in, or no such sweep
        raise ForgelabError(
            f"cannot read W&B sweep {path}: {err} (online and `wandb login` needed)"
        ) from None
    if best is None:
        raise ForgelabError(f"W&B sweep {path} has no runs yet")
    sweep_id = path.rstrip("/").rsplit("/", 1)[-1]
    out = out or root / "sweeps" / sweep_id / BEST_CONFIG
    params = {k: _unwrapped(best.config[k]) for k in definition.get("parameters") or {} if k in best.config}
    command = trial_command(definition, params)
    arguments = forgelab_arguments(command) or []
    if not (arguments[:1] and arguments[0] in TRAINER_SUBCOMMANDS):
        raise ForgelabError(
            f"sweep {path} does not run `forgelab fit`; its best run's command: {' '.join(command)}"
        )
    local = find_run_dir(root, best.id)
    if local is not None and (local / "config.yaml").is_file():
        config = yaml.safe_load((local / "config.yaml").read_text())
        source = f"the resolved config of W&B run {best.id} ({best.name}), best of sweep {path}, from {local}"
    else:
        problem, printed = run_forgelab([*arguments, "--print_config"])
        if problem:
            raise ConfigError(f"the best run's command ({best.name}) does not parse here: {problem}")
        config = yaml.safe_load(printed)
        source = (
            f"W&B run {best.id} ({best.name}), best of sweep {path}: resolved from the sweep's command and the "
            f"run's swept values with this checkout's configs (its run directory is not below {root})"
        )
    write_text(out, best_config_text(config, source, arguments[0]))
    metric = (definition.get("metric") or {}).get("name")
    value = dict(best.summary or {}).get(metric) if metric else None
    scored = f" {metric} {value:.4g}" if isinstance(value, (int, float)) else ""
    values = " ".join(f"{display_key(k)}={_format_value(v)}" for k, v in params.items())
    print(f"best: {best.name} ({best.id}){scored} with {values}", flush=True)
    print(f"re-run it: forgelab {arguments[0]} --config {out}", flush=True)
    return out


def write_best(target: str, root: Path, out: Path | None) -> None:
    """`forgelab sweep --best <sweep dir | entity/project/sweep id>`."""
    directory = Path(target)
    if not (directory / SWEEP_STATE).is_file():
        if directory.exists():
            raise ConfigError(f"{directory} is not a sweep directory (no {SWEEP_STATE})")
        best_from_wandb(target, root, out)
        return
    state = json.loads((directory / SWEEP_STATE).read_text())
    sweep = LocalSweep(state["definition"], directory, state.get("sweep_file", ""))
    sweep.load()
    best = sweep.best_trial()
    if best is None:
        raise ForgelabError(f"sweep {sweep.name} has no finished trial with {sweep.metric or 'a metric'} yet")
    values = " ".join(f"{display_key(k)}={_format_value(v)}" for k, v in best.params.items())
    print(f"best: {best.name} {sweep.metric} {best.metric:.4g} with {values}", flush=True)
    write_local_best(sweep, out)


def dry_run(sweep: LocalSweep, count: int | None) -> None:
    """Print the trials' commands and check each as its trial would start (see `check_trial_command`)."""
    trials = sweep.dry_run_trials(sweep.trial_limit(count))
    parsed = False
    for trial in trials:
        command = sweep.command_for(trial)
        print(" ".join(command), flush=True)  # as it would run: one command a line, ready to paste
        problem = check_trial_command(command)
        if problem:
            values = " ".join(f"{display_key(k)}={_format_value(v)}" for k, v in trial.params.items())
            raise ConfigError(f"{trial.name} ({values}) would fail: {problem}")
        arguments = forgelab_arguments(command)
        parsed = parsed or bool(arguments and arguments[0] in TRAINER_SUBCOMMANDS)
    how = f"parse with `forgelab {forgelab_arguments(command)[0]}`" if parsed else "name programs that exist"
    print(f"dry run: {len(trials)} trial command{'s' if len(trials) != 1 else ''} {how}; nothing was run")


def _write_comparison(sweep: LocalSweep) -> None:
    records, info = load_sweep_dir(sweep.directory)
    out = sweep.directory / "compare"
    table = compare_runs(records, out, sweeps_info=[info])
    print("\n" + table)
    best = sweep.best_trial()
    if best is not None:
        values = " ".join(f"{display_key(k)}={_format_value(v)}" for k, v in best.params.items())
        print(f"\nbest: {best.name} {sweep.metric} {best.metric:.4g} with {values}")
    print(f"comparison: {out / 'compare.md'} (plots in {out / 'plots'})")
    write_local_best(sweep)

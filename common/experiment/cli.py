"""The `forgelab` command: one LightningCLI for every project, plus the projects' own commands.

    forgelab fit --config configs/trainer/default.yaml --config configs/inpaint_probe/tiny.yaml
    forgelab test --config ... --ckpt_path runs/inpaint_probe/<run>/checkpoints/last.ckpt
    forgelab <command> ...      # extract, probe, augment, sweep, compare ... (entry points `forgelab.commands`)
    forgelab --version          # forgelab, torch and Lightning versions
    forgelab --print_shtab bash # shell completion script (also zsh, tcsh; `forgelab fit --print_shtab bash` too)

Model and data are given in subclass mode (`class_path` + `init_args`), so one trainer config schema serves all
projects and trainer presets (configs/trainer/*.yaml) stack with any project config by repeated `--config`.
The trainer commands live in `common.experiment.trainer_cli`, imported only when one of them runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from common.errors import ForgelabError
from common.experiment.cli_extras import is_extra, run_extra
from common.experiment.env import RUN_DIR_ENV
from common.experiment.wandb_state import finish_wandb_run

log = logging.getLogger("forgelab")

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def extra_commands() -> dict[str, Any]:
    """Commands contributed by projects through the `forgelab.commands` entry-point group."""
    return {ep.name: ep for ep in entry_points(group="forgelab.commands")}


def _print_overview(commands: dict[str, Any]) -> None:
    lines = [
        "usage: forgelab <command> [options]",
        "",
        "Trainer commands (LightningCLI; `forgelab <command> --help` for all options):",
        "  fit        train a model:     forgelab fit --config configs/trainer/cpu.yaml --config <project config>",
        "  validate   run validation",
        "  test       test a checkpoint: forgelab test --config <config> --ckpt_path <ckpt>",
        "  predict    score a folder and write predictions.csv",
    ]
    if commands:
        lines += ["", "Project commands:"]
        for name, ep in sorted(commands.items()):
            lines.append(f"  {name:<10} ({ep.value})")
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    logging.basicConfig(
        level=os.environ.get("FORGELAB_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s"
    )
    args = list(sys.argv[1:] if argv is None else argv)
    # `wandb agent` re-runs pre-empted sweep runs with an extra `--_wandb=...` argument jsonargparse rejects.
    args = [a for a in args if not a.startswith("--_wandb")]
    if is_extra(args):  # --version, --print_shtab <shell>: answered without parsing a config
        run_extra(args, extra_commands)
        return
    commands = extra_commands()
    if not args or args[0] in ("-h", "--help"):
        _print_overview(commands)
        return
    inherited_run_dir = os.environ.get(RUN_DIR_ENV)
    exit_code = 1  # what W&B records for a run this call leaves open: 0 only when the command returns
    try:
        if args[0] in commands and args[0] not in TRAINER_COMMANDS:
            command: Callable[[list[str]], Any] = commands[args[0]].load()
            command(args[1:])
        else:
            from common.experiment.trainer_cli import ForgelabCLI

            if argv is None:  # from the console: let LightningCLI read sys.argv, minus what we removed
                sys.argv[1:] = args
            ForgelabCLI(args=None if argv is None else args)
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 255  # wandb's own code for a Ctrl-C
        raise
    except ForgelabError as err:
        print(f"forgelab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:  # the next run in this process (a sweep, a test) must not inherit this run's directory or W&B run
        if inherited_run_dir is None:
            os.environ.pop(RUN_DIR_ENV, None)
        finish_wandb_run(exit_code)


if __name__ == "__main__":
    main()

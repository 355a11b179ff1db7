"""`forgelab --version` and `forgelab --print_shtab <shell>` (shell completion scripts).

Versions come from the installed distributions' metadata, so `--version` answers without importing torch or
Lightning. The completion script is built from the trainer commands' real parser (LightningCLI's, which is
jsonargparse's) by `shtab`, without going through jsonargparse's own completion support: jsonargparse 4.53
replaced `--print_shtab` by `--print_completion shtab-<shell>`, offers it on the top-level parser only and
behind a setting, and follows every subclass a type hint admits into its init arguments, which for Lightning's
trainer (strategies, device meshes, tensors) gives a bash script of about 150 MB. Here every trainer option
appears once, `--config` and `--ckpt_path` complete file names, and the project commands complete by name.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version

from common.errors import ForgelabError

PROG = "forgelab"
VERSIONED = ("forgelab", "torch", "lightning")
FILE_OPTIONS = ("--config", "--ckpt_path")


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def version_text() -> str:
    """`forgelab <version>` on the first line, then the versions of torch and Lightning and of Python."""
    lines = [f"{name} {_version(name)}" for name in VERSIONED]
    lines.append(f"python {sys.version.split()[0]}")
    return "\n".join(lines)


def _wants_completion(arg: str) -> bool:
    return arg == "--print_shtab" or arg.startswith("--print_shtab=")


def is_extra(args: Sequence[str]) -> bool:
    """Whether `args` ask for `--version` (first argument) or a completion script (`--print_shtab` anywhere,
    e.g. `forgelab fit --print_shtab bash`)."""
    return list(args[:1]) == ["--version"] or any(_wants_completion(a) for a in args)


def run_extra(args: Sequence[str], commands: Callable[[], Iterable[str]]) -> None:
    """Print the version or the completion script; a bad shell name exits with status 2 and one line."""
    if list(args[:1]) == ["--version"]:
        print(version_text())
        return
    try:
        print(completion_script(completion_shell(args), commands()))
    except ForgelabError as err:
        print(f"forgelab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def completion_shell(args: Sequence[str]) -> str:
    """The shell of `--print_shtab <shell>` or `--print_shtab=<shell>` in `args`."""
    for i, arg in enumerate(args):
        if arg.startswith("--print_shtab="):
            return arg.split("=", 1)[1]
        if arg == "--print_shtab" and i + 1 < len(args):
            return args[i + 1]
    raise ForgelabError("--print_shtab needs a shell, e.g. `--print_shtab bash` or `--print_shtab zsh`")


def trainer_parser() -> argparse.ArgumentParser:
    """The parser of `forgelab fit|validate|test|predict`, built by ForgelabCLI as a run would build it."""
    from jsonargparse import capture_parser

    from common.experiment.trainer_cli import ForgelabCLI

    with warnings.catch_warnings():  # the command line holds `--print_shtab`, which is why args=[] is given
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        parser = capture_parser(lambda: ForgelabCLI(args=[]))
    parser.prog = PROG
    return parser


def completion_script(shell: str, extra_commands: Iterable[str] = ()) -> str:
    """The completion script of the whole `forgelab` command for `shell` (bash, zsh, tcsh ...: what the
    installed shtab supports)."""
    try:
        import shtab
    except ImportError:
        raise ForgelabError("shell completion needs the shtab package: pip install shtab") from None
    shells = tuple(shtab.SUPPORTED_SHELLS)
    if shell not in shells:
        raise ForgelabError(f"--print_shtab: unsupported shell {shell!r}; choose one of {', '.join(shells)}")
    parser = trainer_parser()
    _prepare(parser, shtab.FILE)
    subcommands = _subcommands_action(parser)
    if subcommands is not None:
        for name in sorted(set(extra_commands) - set(subcommands.choices)):
            # project commands parse their own arguments: complete their names (and -h)
            subcommands.choices[name] = argparse.ArgumentParser(prog=f"{PROG} {name}")
            help_entry = argparse._SubParsersAction._ChoicesPseudoAction(name, (), "project command")
            subcommands._choices_actions.append(help_entry)
    return shtab.complete(parser, shell=shell)


def _subcommands_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _prepare(parser: argparse.ArgumentParser, file_completion: dict[str, str]) -> None:
    """File-name completion for config and checkpoint options, recursively into the subcommands; jsonargparse's
    completion options are dropped from the script (they are not what a user completes)."""
    parser._actions = [a for a in parser._actions if not _is_completion_option(a)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _prepare(subparser, file_completion)
        elif any(option in FILE_OPTIONS for option in action.option_strings):
            action.complete = file_completion  # type: ignore[attr-defined]


def _is_completion_option(action: argparse.Action) -> bool:
    return any(o.startswith("--print_") and o != "--print_config" for o in action.option_strings)

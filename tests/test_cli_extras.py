"""`forgelab --version` and the shell completion script of `forgelab --print_shtab <shell>`."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from common.experiment.cli import main

BASH = shutil.which("bash")


def test_version_prints_forgelab_torch_and_lightning_versions(capsys):
    main(["--version"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"forgelab {version('forgelab')}"
    assert f"torch {version('torch')}" in lines
    assert f"lightning {version('lightning')}" in lines


def test_version_does_not_import_lightning():
    code = (
        "import sys\n"
        "from common.experiment.cli import main\n"
        "main(['--version'])\n"
        "assert 'lightning' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("forgelab ")


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory) -> Path:
    """`forgelab fit --print_shtab bash`, printed once for the module's tests."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["fit", "--print_shtab", "bash"])
    path = tmp_path_factory.mktemp("completion") / "forgelab.bash"
    path.write_text(out.getvalue())
    return path


def _complete(script: Path, words: list[str], cwd: Path) -> list[str]:
    """What bash offers for the last of `words` with the script loaded (what <TAB> shows)."""
    body = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}\n'
        "_shtab_forgelab\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run([BASH, "-c", body], capture_output=True, text=True, cwd=cwd, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_bash_completion_script_is_valid_bash_for_the_forgelab_command(bash_script):
    text = bash_script.read_text()
    assert "complete -o bashdefault -F _shtab_forgelab forgelab" in text
    assert "--trainer.max_epochs" in text and "--config" in text
    # one entry per option: jsonargparse's own shtab support expands subclass init args into a ~150 MB script
    assert len(text) < 200_000
    check = subprocess.run([BASH, "-n", str(bash_script)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_bash_completion_completes_options_commands_and_config_files(bash_script, tmp_path):
    (tmp_path / "configs" / "trainer").mkdir(parents=True)
    (tmp_path / "configs" / "trainer" / "slurm.yaml").write_text("trainer: {}\n")
    fit = ["forgelab", "fit"]
    assert _complete(bash_script, [*fit, "--trainer.max_ep"], tmp_path) == ["--trainer.max_epochs"]
    assert _complete(bash_script, [*fit, "--run.wan"], tmp_path) == ["--run.wandb"]
    assert "fit" in _complete(bash_script, ["forgelab", "f"], tmp_path)
    # project commands (entry points) complete by name
    assert _complete(bash_script, ["forgelab", "swe"], tmp_path) == ["sweep"]
    completed = _complete(bash_script, [*fit, "--config", "configs/trainer/sl"], tmp_path)
    assert completed == ["configs/trainer/slurm.yaml"]


def test_zsh_completion_script(capsys):
    main(["--print_shtab", "zsh"])
    text = capsys.readouterr().out
    assert text.startswith("#compdef forgelab")
    assert "--trainer.max_epochs" in text and "--ckpt_path" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--print_shtab", "cmd.exe"], "unsupported shell 'cmd.exe'"),
        (["fit", "--print_shtab"], "--print_shtab needs a shell"),
    ],
)
def test_completion_with_a_bad_or_missing_shell_is_one_line_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("forgelab: error:") and message in err

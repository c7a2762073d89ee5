"""The commands README.md and docs/comparing-methods.md show run as written, and docs/config.md is
the config reference the code generates: the documents cannot drift from the code.

Every `python -m trgl_pipe.run` and `torchrun ... -m trgl_pipe.run` command of a shell block or of
README's launch table is checked with ``--print-config`` (its keys, values and combinations are
refused in one line exactly as a run would refuse them); ``--help`` runs; the quickstart runs for
real through torchrun, with ``train.max_steps`` added; README's Python example trains a few steps.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_torchrun

from trgl_pipe.describe import config_reference
from trgl_pipe.run import main

README = ROOT / "README.md"
COMPARING = ROOT / "docs" / "comparing-methods.md"


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def _shell_commands(path: Path) -> list[list[str]]:
    """Each command of the file's bash blocks, continuation lines joined, comments dropped and
    shell variables set in the block expanded, as argument lists."""
    commands = []
    for block in _blocks(path, "bash"):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            assignment = re.fullmatch(r'([A-Z_]+)="([^"]*)"', line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            commands.append(shlex.split(line))
    return commands


def _table_commands(path: Path) -> list[list[str]]:
    """The commands in backticks of a Markdown table's second column."""
    found = re.findall(r"^\|[^|]*\| `((?:python|torchrun|sbatch)[^`]*)` \|$", path.read_text(), flags=re.M)
    return [shlex.split(command) for command in found]


def _trainer_args(command: list[str]) -> list[str] | None:
    """The arguments given to trgl_pipe.run, or None for another program."""
    if "-m" in command and command[command.index("-m") + 1] == "trgl_pipe.run":
        return command[command.index("-m") + 2 :]
    return None


def test_the_config_reference_is_the_one_the_code_generates() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), (
        "docs/config.md is stale: python -m trgl_pipe.describe > docs/config.md"
    )


@pytest.mark.parametrize("document", [README, COMPARING], ids=["README", "comparing-methods"])
def test_every_training_command_of_the_docs_is_accepted(document: Path, tmp_path: Path, capsys) -> None:
    commands = _shell_commands(document) + _table_commands(document)
    checked = 0
    for command in commands:
        args = _trainer_args(command)
        if args is None:
            continue
        os.chdir(ROOT)
        if args == ["--help"]:
            with pytest.raises(SystemExit) as exit_:
                main(args)
            assert exit_.value.code == 0
        else:
            code = main([*args, "--print-config"])
            assert code == 0, (command, capsys.readouterr().err[-2000:])
        checked += 1
    assert checked >= (8 if document == README else 10), commands  # the parser found them


@pytest.mark.multiproc
def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    quickstart = [c for c in _shell_commands(README) if c[0] == "torchrun" and "configs/quickstart.yaml" in c]
    assert len(quickstart) == 1, quickstart
    command = quickstart[0]
    nproc = int(next(a for a in command if a.startswith("--nproc_per_node=")).split("=")[1])
    args = [*_trainer_args(command), "train.max_steps=2", "data.val_size=200", "data.test_size=200"]
    args.append(f"out_dir={tmp_path / 'run'}")
    result = run_torchrun(nproc, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best module" in result.stdout and (tmp_path / "run" / "summary.json").is_file()


def test_the_python_example_of_the_readme_trains(tmp_path: Path) -> None:
    (example,) = _blocks(README, "python")
    assert len(example.splitlines()) <= 22  # a minimal example (the 20 lines, blank lines aside)
    # a few steps on part of the test split, in a folder of its own: the rest as written
    given = '**{"model.num_modules": 3}'
    assert given in example
    quick = '**{"model.num_modules": 3, "train.max_steps": 2, "data.val_size": 200, "data.test_size": 200}'
    (tmp_path / "example.py").write_text(example.replace(given, quick))
    result = subprocess.run(
        [sys.executable, "example.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^best module \d: \d+\.\d\d%$", result.stdout, flags=re.M), result.stdout[-1000:]


def test_the_readmes_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text() and ci in (ROOT / "CONTRIBUTING.md").read_text()

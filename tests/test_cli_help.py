"""The command-line help: commands grouped by job, each with an example that names real options."""

from __future__ import annotations

import re

import click
from click.testing import CliRunner

from clipxfer.cli import PANELS, main


def _commands():
    ctx = click.Context(main)
    return {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}


def test_every_command_is_in_exactly_one_panel():
    placed = [name for names in PANELS.values() for name in names]
    assert sorted(placed) == sorted(_commands()), "a command is missing from PANELS or listed twice"


def test_every_command_help_shows_an_example_using_its_own_options():
    for name, command in _commands().items():
        examples = re.findall(r"^\s*Example: (clipxfer .+)$", command.help or "", flags=re.M)
        assert len(examples) == 1, f"{name}: expected one 'Example:' line"
        words = examples[0].split()
        assert words[1] == name or (words[1], words[2]) == tuple(name.split()), f"{name}: {examples[0]}"
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for word in words[2:]:
            if word.startswith("-"):
                assert word in known, f"{name}: example uses unknown option {word}"


def test_top_level_help_groups_commands_by_job():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    headers = [name for name, commands in PANELS.items() if commands]
    positions = [result.output.index(header) for header in headers]
    assert positions == sorted(positions)

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


def _leaves(group, prefix=()):
    """(command words, command) for every runnable command, looking inside groups (anomaly fit ...)."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _leaves(command, (*prefix, name))


def test_every_command_help_shows_an_example_using_its_own_options():
    for words, command in _leaves(main):
        name = " ".join(words)
        examples = re.findall(r"^\s*Example: (clipxfer .+)$", command.help or "", flags=re.M)
        assert len(examples) == 1, f"{name}: expected one 'Example:' line"
        example = examples[0].split()
        assert example[1 : 1 + len(words)] == list(words), f"{name}: {examples[0]}"
        if isinstance(command, click.Group):
            continue  # a group's example runs one of its subcommands, checked on its own
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for word in example[1 + len(words) :]:
            if word.startswith("-"):
                assert word in known, f"{name}: example uses unknown option {word}"


def test_top_level_help_groups_commands_by_job():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    headers = [name for name, commands in PANELS.items() if commands]
    positions = [result.output.index(header) for header in headers]
    assert positions == sorted(positions)

"""The README's command lines name verbs and options that exist (a newcomer copies them)."""

import re
from pathlib import Path

import pytest

from medad_fast.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
# a verb after `medad-fast` or `-m medad_fast.cli` (torchrun)
COMMAND = re.compile(r"(?:^|\s)(?:medad-fast|-m medad_fast\.cli) ([a-z][a-z-]*)")


def readme_command_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, verb, the line with its continuation lines, comments cut) for every command
    line inside the README's code fences."""
    lines = text.split("\n")
    found, in_fence = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        match = COMMAND.search(line) if in_fence else None
        if not match:
            continue
        command = line[match.end():]
        j = i + 1
        # continuation: a backslash at the end, or an indented line of [--options] below
        while j < len(lines) and (command.rstrip().endswith("\\")
                                  or re.match(r"\s{8,}\[", lines[j]) and not COMMAND.search(lines[j])):
            command += " " + lines[j]
            j += 1
        found.append((i + 1, match.group(1), command.split(" #")[0]))
    return found


def options_of(verb: str) -> set[str]:
    parser = build_parser(verb)
    sub = next(a for a in parser._actions if a.dest == "command").choices[verb]
    return {option for action in sub._actions for option in action.option_strings}


def test_readme_command_lines_name_existing_verbs_and_options():
    text = (ROOT / "README.md").read_text()
    commands = readme_command_lines(text)
    assert len(commands) >= 20  # the CLI summary, the walk-through, the volume and torchrun examples
    problems = []
    for number, verb, command in commands:
        if verb not in COMMANDS:
            problems.append(f"README.md:{number}: no verb {verb!r}")
            continue
        unknown = sorted(set(FLAG.findall(command)) - options_of(verb))
        if unknown:
            problems.append(f"README.md:{number}: {verb} has no option {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_wrong_option():
    # the test above must be able to fail: a made-up option and verb are reported
    commands = readme_command_lines("```\nmedad-fast train --data D --no-such-option\nmedad-fast frobnicate X\n```\n")
    assert [(verb, FLAG.findall(c)) for _, verb, c in commands] == [("train", ["--data", "--no-such-option"]),
                                                                  ("frobnicate", [])]
    assert "--no-such-option" not in options_of("train")

"""Every command and flag a message in lmforge/ tells the user to run exists in cli.py's parser
(issue 9 item 14): the strings of the source are read, not a list kept by hand."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import lmforge
from lmforge.cli import build_parser

SOURCE = Path(lmforge.__file__).parent
COMMAND = re.compile(r"(`?)lmforge ([a-z][a-z-]*)((?: [a-z][a-z-]*)?)([^`;)\n]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _message_strings():
    """(file:line, text) of every string in lmforge/ except docstrings; f-strings with their
    placeholders as {}."""
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            else:
                continue
            yield f"{path.relative_to(SOURCE.parent)}:{node.lineno}", text


def check_messages(strings) -> tuple[list[str], int]:
    """(what is wrong, how many command references were checked) for (where, text) pairs."""
    commands = _subparsers(build_parser())
    wrong, checked = [], 0
    for where, text in strings:
        for quoted, name, action, rest in COMMAND.findall(text):
            if name not in commands:
                if quoted:  # `lmforge foo` is always meant as a command
                    wrong.append(f"{where}: `lmforge {name}` is not a command")
                continue  # prose: "lmforge wrote", "lmforge version"
            sub = commands[name]
            actions = _subparsers(sub)
            action = action.strip()
            if actions:
                if action not in actions:
                    wrong.append(f"{where}: lmforge {name} has no action '{action}'")
                    continue
                sub = actions[action]
            else:
                rest = f" {action}{rest}"
            checked += 1
            for flag in FLAG.findall(rest):
                if flag not in _options(sub):
                    wrong.append(f"{where}: lmforge {name} {action} has no {flag} ({text[:80]!r})")
    return wrong, checked


def test_every_command_and_flag_named_in_a_message_exists():
    wrong, checked = check_messages(_message_strings())
    assert checked > 20  # the scan found the messages it is meant to check
    assert not wrong, "\n".join(wrong)


def test_the_check_catches_made_up_commands_and_flags():
    bad = [
        ("a", "pass overwrite; run `lmforge export --checkpoint X --overwrite-all`"),
        ("b", "run `lmforge fetch corpus` first"),
        ("c", "see lmforge checkpoint merge DIR"),
        ("d", "use `lmforge eval --checkpoint C --data D --no-bos`; lmforge wrote this"),
    ]
    wrong, checked = check_messages(bad)
    assert [w.split(":")[0] for w in wrong] == ["a", "b", "c"], wrong

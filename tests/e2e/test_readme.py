"""The README's commands are real: every `contentml` command parses, every make target exists.
(`make demo` and `make test` themselves run in test_e2e.py and CI.)"""

from __future__ import annotations

import re
import shlex

import pytest

from entrypoints.cli import build_parser
from tests.helpers.readme import README, ROOT, shell_lines

DEPLOY_GUIDE = (ROOT / "docs" / "deploy.md").read_text()
SHELL_LINES = shell_lines(README)
CONTENTML_COMMANDS = [line for line in SHELL_LINES if "bin/contentml " in line]
DEPLOY_COMMANDS = [line for line in shell_lines(DEPLOY_GUIDE) if line.startswith("contentml ")]


def test_readme_has_commands():
    assert any(line.startswith("make demo") for line in SHELL_LINES)
    assert any(line.startswith("make test") for line in SHELL_LINES)
    assert len(CONTENTML_COMMANDS) >= 5


@pytest.mark.parametrize("line", CONTENTML_COMMANDS)
def test_readme_contentml_commands_parse(line):
    words = shlex.split(line.split("#")[0])
    argv = words[words.index(next(w for w in words if w.endswith("bin/contentml"))) + 1 :]
    build_parser().parse_args(argv)


@pytest.mark.parametrize("line", DEPLOY_COMMANDS)
def test_deploy_guide_contentml_commands_parse(line):
    build_parser().parse_args(shlex.split(line.split("|")[0].split("#")[0])[1:])


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    mentioned = re.findall(r"`make (\w+)`", README + DEPLOY_GUIDE)
    mentioned += re.findall(r"^make (\w+)", "\n".join(shell_lines(DEPLOY_GUIDE)), flags=re.M)
    for target in mentioned + ["demo", "test"]:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target

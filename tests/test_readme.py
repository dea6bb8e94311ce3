"""The README's commands are real: every `contentml` command parses, every make target exists.
(`make demo` and `make test` themselves run in test_e2e.py and CI.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from contentml.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHELL_LINES = [
    line.strip()
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    for line in block.splitlines()
    if line.strip()
]
CONTENTML_COMMANDS = [line for line in SHELL_LINES if "bin/contentml " in line]


def test_readme_has_commands():
    assert any(line.startswith("make demo") for line in SHELL_LINES)
    assert any(line.startswith("make test") for line in SHELL_LINES)
    assert len(CONTENTML_COMMANDS) >= 5


@pytest.mark.parametrize("line", CONTENTML_COMMANDS)
def test_readme_contentml_commands_parse(line):
    words = shlex.split(line.split("#")[0])
    argv = words[words.index(next(w for w in words if w.endswith("bin/contentml"))) + 1 :]
    build_parser().parse_args(argv)


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"`make (\w+)`", README) + ["demo", "test"]:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target

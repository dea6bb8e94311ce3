"""The README's shell commands, as the tests that parse and run them read them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def shell_lines(text: str) -> list[str]:
    """Each non-empty line of the ```bash blocks in `text`."""
    return [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for line in block.splitlines()
        if line.strip()
    ]

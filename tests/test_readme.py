"""The README's and docs/methods.md's commands stay valid: every `leanlm ...` line (also under torchrun) parses with
the current CLI, names configs that exist and texts that resolve, and the two commands are make targets. Running
them is the demo's and CI's job; this catches a renamed flag or file in seconds."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from leanlm.cli import build_parser
from leanlm.data import text_file

ROOT = Path(__file__).resolve().parents[1]


def commands(markdown: str) -> list[list[str]]:
    """The shell commands of the ```bash blocks, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


README = commands((ROOT / "README.md").read_text())
METHODS = commands((ROOT / "docs" / "methods.md").read_text())


def test_the_two_commands_are_make_targets():
    assert [c for c in README if c[0] == "make"] == [["make", "demo"], ["make", "test"]]
    targets = re.findall(r"^(\w+):", (ROOT / "Makefile").read_text(), flags=re.M)
    assert {"demo", "test"} <= set(targets)


@pytest.mark.parametrize("argv", [c for c in README + METHODS if "leanlm" in c], ids=lambda c: " ".join(c)[:60])
def test_readme_command_parses(argv, monkeypatch):
    argv = argv[argv.index("leanlm") + 1 :]  # after `leanlm` or `torchrun ... -m leanlm`
    args = build_parser().parse_args(argv)  # argparse exits on an unknown verb or flag
    if getattr(args, "config", None):
        assert (ROOT / args.config).is_file(), args.config
    for ref in getattr(args, "data", None) or []:
        text_file(ref)
    if getattr(args, "calibrate", None):
        text_file(args.calibrate)

"""Every `rsedge COMMAND --option ...` line in the READMEs' code blocks parses with today's options."""
import re
import shlex
from pathlib import Path

import pytest

from rsedge.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


def documented_commands(path: Path) -> list[str]:
    inside, joined, out = False, "", []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside, joined = not inside, ""
            continue
        if not inside:
            continue
        text = joined + re.split(r"\s+#", line.strip())[0]
        if text.endswith("\\"):
            joined = text[:-1] + " "
            continue
        joined = ""
        if text.startswith("rsedge ") and " --" in text and text.split()[1] not in ("bench", "build"):
            out.append(text)
    return out


@pytest.mark.parametrize("doc", ["README.md", "compress/README.md"])
def test_documented_commands_parse(doc):
    commands = documented_commands(ROOT / doc)
    assert commands
    parser = build_parser()
    for text in commands:
        try:
            args = parser.parse_args(shlex.split(text)[1:])
        except SystemExit as e:
            raise AssertionError(f"{doc}: `{text}` does not parse") from e
        assert getattr(args, "func", None) is not None, text

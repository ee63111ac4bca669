"""No function or method in trainer/ compress/ export/ cli/ has a body longer than 80 lines.

Why: a stage written as one long function is one nobody can extend without reading all of it,
and it is where the copies come from (three copies of a stage's set-up, a `prune_run` of nearly
200 lines taking 30 parameters). Past 80 lines a function does several things; it is split into
named steps (an options object, a `Stage`, helpers), not excused here. The body is counted from
its first statement (docstring included) to its last line, so a long signature does not count.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "compress", "export", "cli")
MAX_BODY_LINES = 80


def body_lengths(source: str, filename: str = "<source>") -> list[tuple[str, int, int]]:
    """(name, line, body lines) of every function and method of `source`, nested ones too."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node.lineno, node.end_lineno - node.body[0].lineno + 1))
    return out


def test_no_function_body_is_longer_than_80_lines():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20, "the packages moved: point PACKAGES at them"
    too_long = [f"{path.relative_to(ROOT)}:{line} {name}() has {n} lines"
                for path in files for name, line, n in body_lengths(path.read_text(), str(path))
                if n > MAX_BODY_LINES]
    assert not too_long, "split these into named steps:\n" + "\n".join(too_long)


def test_the_count_is_the_body_of_every_function_and_method():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_BODY_LINES))
    source = (f"def short(a,\n          b):\n{body}\n\n"
              f"class C:\n    def long(self):\n        '''doc'''\n{body.replace('    ', '        ')}\n"
              f"        def inner():\n            return 1\n")
    lengths = {name: n for name, _, n in body_lengths(source)}
    assert lengths == {"short": MAX_BODY_LINES, "long": MAX_BODY_LINES + 3, "inner": 1}

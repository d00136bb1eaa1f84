"""Readability limits on the project's modules (every *.py in the repository root), read with `ast`.

No module over 900 lines, no function or method over 60 lines (from its `def` line to its last line,
decorators excluded), no line over 120 characters in ppo.py. A failure lists each offender as
`file:line name (N lines)`.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(REPO.glob("*.py"))
MAX_FILE_LINES = 900
MAX_FUNCTION_LINES = 60
MAX_PPO_LINE_CHARS = 120


def long_functions(path: Path) -> list[str]:
    """`file:line name (N lines)` for each function or method of the module over MAX_FUNCTION_LINES."""
    offenders = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1  # node.lineno is the def line, after any decorator
            if length > MAX_FUNCTION_LINES:
                offenders.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return offenders


def test_modules_are_found():
    assert {"ppo.py", "rewards.py", "models.py", "data.py", "eval.py"} <= {path.name for path in MODULES}


def test_no_module_over_900_lines():
    lengths = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in MODULES}
    offenders = [f"{path.name}:1 module ({n} lines)" for path, n in lengths.items() if n > MAX_FILE_LINES]
    assert not offenders, f"modules over {MAX_FILE_LINES} lines:\n" + "\n".join(offenders)


def test_no_function_over_60_lines():
    offenders = [offender for path in MODULES for offender in long_functions(path)]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_no_line_over_120_characters_in_ppo():
    lines = (REPO / "ppo.py").read_text(encoding="utf-8").splitlines()
    offenders = [f"ppo.py:{number} line ({len(line)} characters)"
                 for number, line in enumerate(lines, start=1) if len(line) > MAX_PPO_LINE_CHARS]
    assert not offenders, f"ppo.py lines over {MAX_PPO_LINE_CHARS} characters:\n" + "\n".join(offenders)

"""The source tree holds no unsafe loading or execution pattern (so none can come back).

Checked on the syntax tree of every ``.py`` file under ``src/`` and ``benchmarks/`` (comments and
docstrings do not count): ``torch.load`` without ``weights_only=True``; ``pickle.load(s)`` outside
``data/refs_file.py``, whose refs pickle goes through a restricted ``pickle.Unpickler`` subclass;
``yaml.load`` without a safe loader, ``yaml.unsafe_load`` / ``full_load``; ``eval`` / ``exec``;
``os.system``; and the keywords ``shell=True``, ``trust_remote_code=True``, ``allow_pickle=True``,
``weights_only=False``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFER = Path("src/pixellm/data/refs_file.py")  # the one place allowed to unpickle (restricted)
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}
BANNED_KEYWORDS = {
    ("shell", True),
    ("trust_remote_code", True),
    ("allow_pickle", True),
    ("weights_only", False),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, relative: Path) -> list[str]:
    """``"line: what"`` for every unsafe pattern in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        problem = None
        if name == "torch.load":
            flag = _keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problem = "torch.load without weights_only=True"
        elif name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads") and relative != REFER:
            problem = f"{name} (use safetensors / torch.load(weights_only=True))"
        elif name == "yaml.load":
            loader = _keyword(node, "Loader")
            if loader is None and len(node.args) > 1:
                loader = node.args[1]
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                problem = "yaml.load without SafeLoader"
        elif name in ("yaml.unsafe_load", "yaml.full_load", "eval", "exec", "os.system"):
            problem = name
        for keyword in node.keywords:
            value = keyword.value
            if isinstance(value, ast.Constant) and (keyword.arg, value.value) in BANNED_KEYWORDS:
                problem = f"{keyword.arg}={value.value}"
        if problem:
            found.append(f"{relative}:{node.lineno}: {problem}")
    return found


def test_the_checker_finds_each_pattern() -> None:
    bad = """
import torch, pickle, yaml, os, subprocess
torch.load("a")
torch.load("a", weights_only=False)
pickle.loads(b"")
yaml.load(open("c"))
yaml.load(open("c"), Loader=yaml.Loader)
eval("1")
exec("x = 1")
os.system("ls")
subprocess.run("ls", shell=True)
AutoModel.from_pretrained("x", trust_remote_code=True)
np.load("x", allow_pickle=True)
"""
    good = """
torch.load("a", weights_only=True, map_location="cpu")
yaml.load(open("c"), Loader=yaml.SafeLoader)
yaml.safe_load(open("c"))
model.eval()
'''torch.load(x) in a docstring'''
"""
    lines = [int(f.split(":")[1]) for f in unsafe_calls(bad, Path("src/x.py"))]
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert unsafe_calls(good, Path("src/x.py")) == []
    assert unsafe_calls("pickle.load(f)", REFER) == []


def test_source_tree_has_no_unsafe_pattern() -> None:
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 20
    found = [f for p in files for f in unsafe_calls(p.read_text(), p.relative_to(ROOT))]
    assert found == []


def test_refs_unpickler_is_restricted() -> None:
    refer = ROOT / REFER
    assert refer.exists(), f"{REFER} moved: point this test at the refs unpickler"
    tree = ast.parse(refer.read_text())
    unpicklers = [
        c for c in ast.walk(tree)
        if isinstance(c, ast.ClassDef) and any(_dotted(b) == "pickle.Unpickler" for b in c.bases)
    ]
    assert unpicklers, f"{REFER} must unpickle through a pickle.Unpickler subclass"
    assert all(
        any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in c.body) for c in unpicklers
    ), "the refs unpickler must override find_class"

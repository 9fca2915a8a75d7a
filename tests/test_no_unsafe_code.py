"""Source-level guarantees: no pickle, eval or exec anywhere in the shipped packages, and
every numpy/torch load refuses pickled objects. A grep, so it cannot be fooled by a test
that never reaches the code path."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "export", "firmware_sim")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_eval_exec(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in ("pickle", "cPickle", "dill", "shelve", "marshal")
                           for n in names), f"{path}:{node.lineno} imports a pickle module"
    for node, owner, name in _calls(tree):
        assert not (owner == "" and name in ("eval", "exec")), f"{path}:{node.lineno}: {name}()"
        if owner in ("np", "numpy") and name == "load":
            kw = {k.arg: k.value for k in node.keywords}
            assert "allow_pickle" in kw and isinstance(kw["allow_pickle"], ast.Constant) \
                and kw["allow_pickle"].value is False, \
                f"{path}:{node.lineno}: np.load without allow_pickle=False"
        if owner == "torch" and name == "load":
            kw = {k.arg: k.value for k in node.keywords}
            assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                f"{path}:{node.lineno}: torch.load without weights_only=True"


def test_the_scan_sees_the_packages():
    assert len(SOURCES) > 50

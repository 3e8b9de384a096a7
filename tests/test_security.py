"""Static checks of the package: no unrestricted unpickling, no run-time downloads."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "endodistill"


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def test_no_unrestricted_unpickling() -> None:
    offenders = []
    for py in PKG.rglob("*.py"):
        tree = ast.parse(py.read_text(encoding="utf-8"))
        for call in _calls(tree):
            name = _name(call)
            kw = {k.arg: k.value for k in call.keywords}
            where = f"{py.relative_to(PKG)}:{call.lineno}"
            if name.endswith(("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load")):
                offenders.append(f"{where} {name}")
            if name in {"torch.load", "load"} and name == "torch.load":
                val = kw.get("weights_only")
                if not (isinstance(val, ast.Constant) and val.value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
            if name.endswith("np.load") or name.endswith("numpy.load"):
                val = kw.get("allow_pickle")
                if isinstance(val, ast.Constant) and val.value is True:
                    offenders.append(f"{where} np.load(allow_pickle=True)")
    assert not offenders, "unrestricted unpickling: " + "; ".join(offenders)


def test_no_hub_downloads() -> None:
    """Weights are never fetched implicitly: no torch.hub / weights enums resolved at import or run time."""
    offenders = []
    for py in PKG.rglob("*.py"):
        text = py.read_text(encoding="utf-8")
        for bad in ("torch.hub.load(", "load_state_dict_from_url(", "urlopen(", "requests.get("):
            if bad in text:
                offenders.append(f"{py.relative_to(PKG)}: {bad}")
    assert not offenders, "; ".join(offenders)

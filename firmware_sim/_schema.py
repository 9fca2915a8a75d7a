"""Strict reading of parsed TOML tables, and writing them back (for `firmware_sim.scenario`).

`Table` wraps one table of a parsed document: constructing it refuses unknown keys (with the
closest known one suggested), and its typed getters refuse wrong types, so the loader reads
like a schema. Every error is a ConfigError ``"{source}: {key}={value}: expected ..."``
with the key spelled as the user would look for it: ``labels.noise``, ``phases[2].mix.walk``.
`dumps_toml` writes the small subset of TOML the scenario dicts use (it has no writer in the
standard library).
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from agent.config_file import suggest
from agent.errors import ConfigError

_REQUIRED: Any = object()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(source: str, key: str, value: object, expected: str) -> NoReturn:
    raise ConfigError(f"{source}: {key}={_show(value)}: expected {expected}")


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Table:
    """One table of a parsed document at `where` (``""`` for the top level)."""

    def __init__(self, data: object, where: str, known: tuple[str, ...], source: str,
                 top_keys: tuple[str, ...] = ()):
        self.where, self.source = where, source
        self.scalars: tuple[str, ...] = ()  # top-level keys, for a hint when one is misplaced
        if not isinstance(data, dict):
            what = f"a table [{where}]" if where else "a TOML document (a table)"
            fail(source, where or "<document>", data, what)
        self.data: dict = data
        for k in data:
            if k not in known:
                if k in top_keys:
                    hint = (f" ({k!r} is a top-level key: keys after a [section] header "
                            "belong to that section, so move it above the first one)")
                else:
                    hint = suggest(k, list(known))
                raise ConfigError(f"{source}: unknown key {self.key(k)}{hint}; "
                                  f"known: {', '.join(known)}")

    def key(self, k: str) -> str:
        return f"{self.where}.{k}" if self.where else k

    def check(self, k: str, ok: bool, value: object, expected: str) -> None:
        if not ok:
            fail(self.source, self.key(k), value, expected)

    def _get(self, k: str, default: object, expected: str, ok) -> Any:
        if k not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: {self.key(k)} is missing: expected {expected}")
            return default
        value = self.data[k]
        self.check(k, ok(value), value, expected)
        return value

    def str(self, k: str, default: object = _REQUIRED) -> Any:
        return self._get(k, default, "a string", lambda v: isinstance(v, str))

    def int(self, k: str, default: object = _REQUIRED) -> Any:
        return self._get(k, default, "an integer", _is_int)

    def num(self, k: str, default: object = _REQUIRED) -> Any:
        v = self._get(k, default, "a finite number", _is_num)
        return float(v) if _is_num(v) else v

    def strs(self, k: str, default: object = _REQUIRED) -> Any:
        v = self._get(k, default, "a list of strings",
                      lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
        return tuple(v) if isinstance(v, list) else v

    def nums(self, k: str, default: object = _REQUIRED) -> Any:
        v = self._get(k, default, "a list of finite numbers",
                      lambda v: isinstance(v, list) and all(_is_num(x) for x in v))
        return tuple(float(x) for x in v) if isinstance(v, list) else v

    def ints(self, k: str, default: object = _REQUIRED) -> Any:
        v = self._get(k, default, "a list of integers",
                      lambda v: isinstance(v, list) and all(_is_int(x) for x in v))
        return tuple(v) if isinstance(v, list) else v

    def pairs(self, k: str, default: object = _REQUIRED) -> Any:
        v = self._get(k, default, "a list of [number, number] pairs",
                      lambda v: isinstance(v, list) and all(
                          isinstance(p, list) and len(p) == 2 and all(_is_num(x) for x in p)
                          for p in v))
        return tuple((float(a), float(b)) for a, b in v) if isinstance(v, list) else v

    def table_value(self, k: str, default: object = _REQUIRED) -> Any:
        """A raw inline table (``mix = {...}``): keys are data, not schema."""
        return self._get(k, default, "a table ({key = value, ...})", lambda v: isinstance(v, dict))

    def table(self, k: str, known: tuple[str, ...]) -> Table:
        """A [section]; missing means all defaults."""
        return Table(self.data.get(k, {}), self.key(k), known, self.source, self.scalars)

    def tables(self, k: str, known: tuple[str, ...]) -> list[Table]:
        """An array of tables ([[section]]); missing means none."""
        v = self._get(k, [], f"an array of tables [[{k}]]",
                      lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v))
        return [Table(x, f"{self.key(k)}[{i}]", known, self.source) for i, x in enumerate(v)]


# --------------------------------------------------------------------------- writing

def _toml_str(s: str) -> str:
    # JSON escapes are TOML escapes, except that TOML also wants DEL escaped.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else _toml_str(k)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"Invalid TOML value: {v!r} (only finite numbers are written)")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}"
                               for k, x in v.items()) + "}"
    raise ValueError(f"Invalid TOML value: {v!r} (type {type(v).__name__})")


def dumps_toml(doc: dict) -> str:
    """TOML text of `doc`: scalars first, then [tables] and [[arrays of tables]]; values
    inside tables are written inline."""
    lines: list[str] = []
    sections: list[str] = []
    for k, v in doc.items():
        if isinstance(v, dict):
            sections.append(f"\n[{_toml_key(k)}]")
            sections += [f"{_toml_key(str(kk))} = {_toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                sections.append(f"\n[[{_toml_key(k)}]]")
                sections += [f"{_toml_key(str(kk))} = {_toml_value(vv)}"
                             for kk, vv in item.items()]
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines + sections) + "\n"

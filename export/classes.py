"""Train on a subset of a dataset's classes; the device learns the others later.

    sub, info = select_classes(ds, base_classes=5)      # the first 5 in the dataset's order
    sub, info = select_classes(ds, classes=["walk", "run", "idle"])

The subset's class order (the logit order) is the order given, or the dataset's order for
``base_classes``. Both splits (train and test) keep only rows of the chosen classes, with
labels re-indexed into the subset. ``info`` goes into the manifest: ``dataset_classes``
(all, in the dataset's order) and ``held_out_classes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from agent.dataset import Dataset
from agent.errors import ConfigError, DatasetError


def parse_class_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; empty names are refused."""
    names = [s.strip() for s in text.split(",")]
    if not names or any(not s for s in names):
        raise ConfigError(f"--classes {text!r}: expected comma-separated class names, e.g. a,b,c")
    return names


def select_classes(ds: Dataset, classes: Sequence[str] | None = None,
                   base_classes: int | None = None) -> tuple[Dataset, dict[str, Any]]:
    """The dataset restricted to ``classes`` (names) or to its first ``base_classes``.

    With neither, the dataset is returned unchanged. Raises ConfigError for unknown or
    duplicate names, both arguments at once, or a ``base_classes`` out of range, and
    DatasetError when the subset has fewer than two classes.
    """
    all_classes = tuple(ds.classes)
    info: dict[str, Any] = {"dataset_classes": list(all_classes), "held_out_classes": []}
    if classes is None and base_classes is None:
        return ds, info
    if classes is not None and base_classes is not None:
        raise ConfigError("give either classes (--classes) or base_classes (--base-classes), "
                          "not both")
    if base_classes is not None:
        if isinstance(base_classes, bool) or not isinstance(base_classes, int | np.integer) \
                or not 1 <= base_classes <= len(all_classes):
            raise ConfigError(f"base_classes={base_classes!r}, expected an integer in "
                              f"[2, {len(all_classes)}] (the dataset has {len(all_classes)} "
                              "classes)")
        chosen = list(all_classes[:int(base_classes)])
    else:
        chosen = [str(c) for c in classes]
        unknown = [c for c in chosen if c not in all_classes]
        if unknown:
            shown = ", ".join(repr(c) for c in all_classes[:20])
            more = ", ..." if len(all_classes) > 20 else ""
            raise ConfigError(f"unknown class(es) {unknown} (the dataset's classes: "
                              f"{shown}{more})")
        dupes = sorted({c for c in chosen if chosen.count(c) > 1})
        if dupes:
            raise ConfigError(f"classes: {dupes} given more than once")
    if len(chosen) < 2:
        raise DatasetError(f"the class subset {chosen} has {len(chosen)} class; training "
                           "needs >= 2 classes")
    old_index = np.array([all_classes.index(c) for c in chosen], dtype=np.int64)
    remap = np.full(len(all_classes), -1, dtype=np.int64)
    remap[old_index] = np.arange(len(chosen))

    def take(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = remap[y] >= 0
        return X[keep], remap[y[keep]]

    X, y = take(ds.X, ds.y)
    X_test, y_test = take(ds.X_test, ds.y_test)
    info["held_out_classes"] = [c for c in all_classes if c not in chosen]
    return replace(ds, X=X, y=y, X_test=X_test, y_test=y_test, classes=tuple(chosen)), info

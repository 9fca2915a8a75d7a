"""FlyModel-style associative readout on sparse codes (Shen, Dasgupta & Navlakha, 2021).

One weight per (unit, class). Learning a labelled code moves only the weights from that
code's k active units to its class (`kernels.assoc_update`), so learning a new class barely
touches the units that encode old ones; reading out sums the active units' rows.
Complements the kNN vote: constant time and memory in the number of episodes, and it keeps
what evicted episodes taught.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from agent.errors import ConfigError
from agent.memory import kernels
from agent.memory._checks import code_array, int_scalar
from agent.memory.errors import MemoryInputError, MemoryStateError

MAX_CLASSES = 2**20


@dataclass(frozen=True)
class ReadoutConfig:
    n_units: int = 2048      # m, as the SparseCoder's
    code_k: int = 41         # k, as the SparseCoder's
    lr: float = 0.5          # fraction of the way to 1 per exposure: one shot gives 0.5

    def __post_init__(self):
        if not isinstance(self.n_units, int) or self.n_units < 1:
            raise ConfigError(f"n_units={self.n_units!r}, expected an int >= 1")
        if not isinstance(self.code_k, int) or not 1 <= self.code_k <= self.n_units:
            raise ConfigError(f"code_k={self.code_k!r}, expected an int in [1, n_units={self.n_units}]")
        if not isinstance(self.lr, int | float) or not 0.0 < self.lr <= 1.0:
            raise ConfigError(f"lr={self.lr!r}, expected 0 < lr <= 1")


class AssociativeReadout:
    """Class scores from a sparse code; grows a column when a new label is learned.

    >>> ro = AssociativeReadout(ReadoutConfig(n_units=8, code_k=2))
    >>> ro.learn([1, 5], label=2)
    >>> ro.scores([1, 5]).round(2).tolist()
    [0.0, 0.0, 0.5]
    """

    def __init__(self, config: ReadoutConfig = ReadoutConfig()):
        self.config = config
        self._lock = threading.Lock()
        self.weights_ = np.zeros((config.n_units, 8), dtype=np.float32)   # (m, K capacity)
        self.n_classes = 0

    def learn(self, code, label: int) -> None:
        """Strengthen the active units' weights to `label` (0 <= label < 2**20)."""
        code = code_array(code, name="code", k=self.config.code_k, n_units=self.config.n_units)
        label = int_scalar(label, name="label", lo=0, hi=MAX_CLASSES - 1)
        with self._lock:
            if label >= self.weights_.shape[1]:
                grown = np.zeros((self.config.n_units, max(label + 1, 2 * self.weights_.shape[1])),
                                 dtype=np.float32)
                grown[:, : self.weights_.shape[1]] = self.weights_
                self.weights_ = grown
            self.n_classes = max(self.n_classes, label + 1)
            kernels.assoc_update(self.weights_, code, label, float(self.config.lr))

    def scores(self, code) -> np.ndarray:
        """(n_classes,) f32 in [0, 1]: mean over the active units of their weight to each class."""
        code = code_array(code, name="code", k=self.config.code_k, n_units=self.config.n_units)
        with self._lock:
            out = kernels.assoc_readout(self.weights_, code)[: self.n_classes]
        return out / np.float32(self.config.code_k)

    def scores_batch(self, codes) -> np.ndarray:
        """`scores` for a batch of codes (B, k) -> (B, n_classes) f32."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.config.code_k or codes.dtype.kind not in "iu" \
                or (codes.size and (codes.min() < 0 or codes.max() >= self.config.n_units)):
            raise MemoryInputError(f"codes have shape {codes.shape} dtype {codes.dtype}, expected "
                                   f"(B, {self.config.code_k}) unit ids < {self.config.n_units}")
        with self._lock:
            W = self.weights_[:, : self.n_classes]                       # (m, K)
            return W[codes].sum(axis=1) / np.float32(self.config.code_k)  # (B, K)

    def state_arrays(self) -> dict[str, np.ndarray]:
        with self._lock:
            return {"weights": self.weights_[:, : self.n_classes].copy()}

    @classmethod
    def from_state(cls, config: ReadoutConfig, arrays: dict[str, np.ndarray]) -> AssociativeReadout:
        W = np.asarray(arrays.get("weights"))
        if W.ndim != 2 or W.shape[0] != config.n_units or W.dtype != np.float32:
            raise MemoryStateError(f"readout weights have shape {W.shape} dtype {W.dtype}, "
                                   f"expected ({config.n_units}, n_classes) float32")
        if not (np.isfinite(W).all() and (W >= 0).all() and (W <= 1).all()):
            raise MemoryStateError("readout weights must be finite and within [0, 1]")
        self = cls(config)
        self.n_classes = W.shape[1]
        self.weights_ = np.zeros((config.n_units, max(8, W.shape[1])), dtype=np.float32)
        self.weights_[:, : W.shape[1]] = W
        return self

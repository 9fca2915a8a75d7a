"""Physics-based sensor models for the simulator: an IMU, a machine's vibration, a room's climate.

Each model (`SensorModel`) names its channels, units and sample rate and generates seeded,
parametrized classes: `model.window(cls, n, rng)` draws one independent bout (datasets),
`model.source(cls, seed)` one device's continuous stream (`Source.read`, `Source.set_class`).
`get_model(name, **params)` builds a model by name; `make_dataset` draws a labelled set.

>>> imu = get_model("imu")
>>> imu.channels, imu.rate_hz
(('ax', 'ay', 'az', 'gx', 'gy', 'gz'), 50.0)
>>> get_model("vibration", rpm=1500).classes[:3]
('healthy', 'imbalance', 'misalignment')
"""

from __future__ import annotations

import inspect

from agent.errors import ConfigError
from firmware_sim.sensors.base import SensorModel, Source, make_dataset
from firmware_sim.sensors.environment import EnvironmentModel
from firmware_sim.sensors.imu import ImuModel
from firmware_sim.sensors.vibration import VibrationModel

MODELS: dict[str, type[SensorModel]] = {
    "imu": ImuModel,
    "vibration": VibrationModel,
    "environment": EnvironmentModel,
}


def get_model(name: str, **params) -> SensorModel:
    """The model called `name` with `params` (its `__init__` keywords).

    Raises ConfigError naming an unknown model, an unknown parameter (listing the known
    ones) or a bad value (``model.param``).
    """
    try:
        cls = MODELS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"Unknown sensor model {name!r} "
                          f"(expected one of {', '.join(MODELS)})") from None
    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in params:
        if key not in known:
            raise ConfigError(f"Unknown parameter {name}.{key} "
                              f"(expected one of {', '.join(known)})")
    return cls(**params)


__all__ = ["MODELS", "EnvironmentModel", "ImuModel", "SensorModel", "Source", "VibrationModel",
           "get_model", "make_dataset"]

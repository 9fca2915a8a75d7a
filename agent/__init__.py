"""reverie's on-device runtime.

Importing this package is cheap and never imports torch, `export` or `firmware_sim`
(tests check `sys.modules`). Heavy modules (onnxruntime, paho) are imported by the
submodules that need them.
"""

__version__ = "0.1.0"

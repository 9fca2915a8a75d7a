"""Offline training in torch and export of ONNX bundles for the `agent` runtime.

Importing this package (and `export.cli`) is cheap: torch is imported by the
submodules that need it, so ``reverie --help`` stays fast.

    from export import quantize_bundle, train_bundle, verify_bundle
    bundle_dir = train_bundle("digits.npz", "bundles/digits")
    print("\\n".join(verify_bundle(bundle_dir, data="digits.npz").lines()))
    int8_dir = quantize_bundle(bundle_dir, "digits.npz").out    # bundles/digits-int8
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.pipeline import train_bundle
    from export.quantize import quantize_bundle
    from export.verify import verify_bundle

__all__ = ["quantize_bundle", "train_bundle", "verify_bundle"]


def __getattr__(name: str) -> Any:
    if name == "train_bundle":
        from export.pipeline import train_bundle
        return train_bundle
    if name == "quantize_bundle":
        from export.quantize import quantize_bundle
        return quantize_bundle
    if name == "verify_bundle":
        from export.verify import verify_bundle
        return verify_bundle
    raise AttributeError(f"module 'export' has no attribute {name!r}")

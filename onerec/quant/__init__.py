"""FP8 post-training quantization of OneRec-V2.

    from onerec.quant import quantize, make_recipe, Calibration
    report = quantize(model, make_recipe("fp8_dynamic"), Calibration(requests, table))

Modules: fp8 (primitives, FP8Linear), recipes (configs, handlers, quantize), calibrate
(observers, SQNR), export (save_quantized/load_quantized, quantize_folder), analysis,
quality_gate. Attributes are imported lazily so that `import onerec.quant` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "quantize": "onerec.quant.recipes",
    "make_recipe": "onerec.quant.recipes",
    "QuantizationReport": "onerec.quant.recipes",
    "RECIPES": "onerec.quant.recipes",
    "Calibration": "onerec.quant.calibrate",
    "FP8Linear": "onerec.quant.fp8",
    "save_quantized": "onerec.quant.export",
    "load_quantized": "onerec.quant.export",
    "quantize_folder": "onerec.quant.export",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'onerec.quant' has no attribute {name!r}")

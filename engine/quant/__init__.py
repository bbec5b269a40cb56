"""Weight quantization at load: int8 / int4 group-wise, w8a8 (`--quantization`).

`quantize_model` swaps every projection of a loaded model for a `QuantLinear`
with the same call signature, so the model code is unchanged. Quantized
tensors are cached on disk next to the converted weights (see engine.loader).
"""

from __future__ import annotations

from engine.config import QUANTIZATIONS
from engine.quant.apply import quantize_model, weight_bytes
from engine.quant.linear import QuantLinear
from engine.quant.scheme import SCHEMES, QuantizedWeight, dequantize, quantize

__all__ = ["QUANTIZATIONS", "SCHEMES", "QuantLinear", "QuantizedWeight", "dequantize", "quantize",
           "quantize_model", "weight_bytes"]

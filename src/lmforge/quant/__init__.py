"""Weight-only INT8/INT4 quantization: schemes, packing, quantized layers and the swap into a model."""

from lmforge.quant.layers import QuantLinear, make_quantized, quantize_, scheme_of
from lmforge.quant.pack import Packed
from lmforge.quant.scheme import QuantScheme

__all__ = ["Packed", "QuantLinear", "QuantScheme", "make_quantized", "quantize_", "scheme_of"]

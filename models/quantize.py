"""INT8 quantization of an exported ONNX seg model: ONNX Runtime's static QDQ quantization of model.onnx itself (the
ONNX exporter has folded its BatchNorms into the convolutions), calibrated on images that any dataset of
{"image": (3, H, W)} samples gives. Which images, and what the result costs and gains: evaluation/int8.py."""
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from models.deploy import INPUT_NAME

INSTALL_HINT = "pip install onnxruntime (listed in requirements.txt)"
# entropy is left out: through quantize_static ORT fixes its histogram at 128 bins = 128 quantized bins, so the
# threshold search has one candidate, the full range: the MinMax model
CALIBRATION_METHODS = ("minmax", "percentile")
CALIB_CHUNK = 16  # calibration images whose activations are held at once


def require_onnxruntime():
    """onnxruntime and its quantization package, or an ImportError that says what to install."""
    try:
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"--int8 needs ONNX Runtime's quantization tools: {INSTALL_HINT}") from exc
    return onnxruntime


def spread(total: int, n: int) -> list[int]:
    """min(n, total) indices spread evenly over range(total): a calibration set drawn from the whole split."""
    n = min(n, total)
    return sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)})


def chunk(n: int) -> int:
    """The largest divisor of n up to CALIB_CHUNK: ONNX Runtime calibrates in chunks that divide the set exactly."""
    return max(d for d in range(1, min(n, CALIB_CHUNK) + 1) if n % d == 0)


def calibration_reader(images: Sequence[dict], n: int):
    """An onnxruntime CalibrationDataReader of n samples spread over `images`, (1, 3, H, W) float32 one by one, read a
    chunk at a time (set_range): calibration then holds one chunk's activations, not all n images' at once."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.indices = spread(len(images), n)
            self.set_range(0, len(self.indices))

        def __len__(self) -> int:
            return len(self.indices)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.indices[start_index:end_index])

        def get_next(self) -> dict | None:
            i = next(self.pending, None)
            return None if i is None else {INPUT_NAME: images[i]["image"].as_subclass(Tensor)[None].numpy()}

    return Reader()


def quantize(src: Path, dst: Path, reader, method: str = "minmax") -> dict:
    """Static QDQ quantization of src into dst: uint8 activations (per tensor, asymmetric; ONNX Runtime's u8s8 kernels
    are its fast path on x86), int8 weights per output channel; returns the settings, for the report."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    # "CalibStridedMinMax" is ORT's name for chunked calibration; it serves every method (the calibrator's ranges or
    # histograms merge across chunks). Not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops those chunks unused.
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
                    extra_options={"CalibStridedMinMax": chunk(len(reader))})
    return {"format": "QDQ", "activations": "uint8, per tensor", "weights": "int8, per output channel",
            "calibration_method": method, "kept_in_float": kept_in_float(src)}


def kept_in_float(path: Path) -> dict[str, int]:
    """Operator types of the ONNX model at `path` (and how many nodes of each) that compute on float tensors but
    that ONNX Runtime's static quantizer has no int8 form for: quantize() leaves them in float, between a
    DequantizeLinear and a QuantizeLinear (MobileNetV3's HardSwish / HardSigmoid, for example). {} for the ResNets."""
    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    floats = {v.name for v in (*graph.input, *graph.value_info, *graph.output)
              if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    quantizable = set(QDQRegistry) | set(QLinearOpsRegistry)
    kept: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in quantizable and any(o in floats for o in node.output):
            kept[node.op_type] = kept.get(node.op_type, 0) + 1
    return dict(sorted(kept.items()))

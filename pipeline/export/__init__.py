"""Files a phone takes: ONNX (optimum layout), quantised variants, .ort, onnxruntime-genai folders, Core ML."""

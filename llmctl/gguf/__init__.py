"""GGUF sources: read a GGUF file and carry its quantized blocks into ONNX.

``reader`` opens and validates a file, ``blocks`` decodes each block type into
``MatMulNBits`` codes, scales and zero points, ``names`` maps GGUF tensor names to the
ONNX graph's weights per architecture, and ``transcode`` rewrites a float graph with them.
"""

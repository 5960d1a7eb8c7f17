"""Exporters: a Hugging Face checkpoint folder in, an ONNX artifact folder out."""

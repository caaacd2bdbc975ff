"""sgl-longspec: speculative decoding for long-context agent traffic, as an SGLang plugin."""

__version__ = "0.1.0"

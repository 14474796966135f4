"""onerec-fp8: FP8 post-training quantization and serving for OneRec-V2 generative recommenders."""

__version__ = "0.1.0"

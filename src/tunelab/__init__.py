"""tunelab: a reproducible LLM fine-tuning lab."""
__version__ = "0.1.0"

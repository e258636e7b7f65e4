"""raychat: a ChatGPT-style training pipeline on Ray."""
__version__ = "0.1.0"

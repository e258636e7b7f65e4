"""Evaluation of base models: bits-per-byte on held-out text (bpb.py) and CORE, the 22 in-context
learning tasks of DCLM (core.py); base.py is the `raychat eval base` command that spreads them over
Ray actors. The trainer imports `evaluate_bpb` and `evaluate_core` from here and runs them in-process."""
from raychat.eval.bpb import evaluate_bpb, limit_tokens
from raychat.eval.core import centered_accuracy, evaluate_core

__all__ = ["evaluate_bpb", "limit_tokens", "evaluate_core", "centered_accuracy"]

"""Trainers: one optimizer step (step.py) shared by the Ray + DeepSpeed trainer and the bare loop."""

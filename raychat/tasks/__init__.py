"""Conversation tasks (one module each) and their mixtures: the data of mid-training, SFT, chat
evaluation and RL. See common.py for the Task interface and where rows come from."""

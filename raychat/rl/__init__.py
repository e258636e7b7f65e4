"""Reinforcement learning on verifiable tasks (GSM8K): rollout actors, rewards, the RL learner stage."""

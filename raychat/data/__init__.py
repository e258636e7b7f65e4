"""Pretraining data: FineWeb-EDU shards (fineweb.py) and the packed, resumable token stream (pretrain.py)."""

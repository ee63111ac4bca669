"""Compression: importance criteria, structural pruning with physical slimming, fine-tuning.

Depends on `rsedge.trainer` (models, model files, training loops), never the other way round.
"""

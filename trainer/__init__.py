"""Host-side training: datasets, transforms, the model registry, model files, train/eval loops.

Importing this package imports nothing heavy; torch is imported by the modules that need it.
"""

"""`apollo-fast train`: data validation, exact general-data mixing, atomic checkpoints, the training loop.

Public API: TrainConfig, train (apollo_fast.training.loop); the modules data, mixing, checkpoint.
Imported lazily by the CLI, so `import apollo_fast` does not load transformers.
"""

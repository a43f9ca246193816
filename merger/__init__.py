"""merger: merge fine-tuned checkpoints of one base model, driven by YAML recipes."""

__version__ = "0.1.0"

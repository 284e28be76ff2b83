"""Bundled compression recipes (YAML), usable by name: ``squeezer.compress(model, "prune50-int8-finetune")``."""

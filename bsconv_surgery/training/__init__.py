"""Training converted models: recipes, datasets, the loop (regulariser, distillation, AMP), checkpoints
with exact resume, and DistributedDataParallel under torchrun. The CLI front is ``bsconv-surgery train``."""

from .recipe import Recipe, load_recipe
from .run import RunResult, run_training

__all__ = ["Recipe", "RunResult", "load_recipe", "run_training"]

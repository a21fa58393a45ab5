"""Keeping a trained model's answers: fidelity, sensitivity, selection, BatchNorm recalibration, distillation."""

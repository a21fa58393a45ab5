"""Datasets and calibration sources: named sets, image folders, and any iterable of batches."""

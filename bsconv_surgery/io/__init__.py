"""Files: ``files.py`` (atomic writes, refusing existing targets) and ``saving.py`` (a converted
model as ``model.safetensors`` + ``surgery.json``)."""

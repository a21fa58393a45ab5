"""``compress``: a trained model under a budget and back to its original's answers in one call
(``pipeline.py``: the stages; ``data.py``: the held-out split; ``progressive.py``: conversion in
stages; ``state.py``: the run folder and ``--resume``; ``result.py``: ``CompressResult``)."""

from .pipeline import compress
from .result import CompressResult

__all__ = ["compress", "CompressResult"]

"""Everything the passes know about a model's graph, and how they change the eager model.

- ``tracing.py``: ``SurgeryTracer`` (convs, BatchNorms and timm's no-trace modules stay leaves),
  ``trace_model`` (with the graphs of leaf modules that hold convs), ``module_call_counts``;
- ``discovery.py``: ``discover`` classifies every conv (standard, pointwise, depthwise, grouped,
  hidden) and puts a ``ConvInfo`` on its node (``node.meta["bsconv"]``);
- ``graph.py``: node roles and graph walks (chains between convs, gates, residual adds);
- ``modules.py``: module swaps by qualified name, parameter counts, temporary train/eval mode,
  the eval-mode affine map of a BatchNorm.
"""

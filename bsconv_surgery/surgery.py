"""The entry points: ``convert()`` a model, ``load_converted()`` a saved conversion.

``convert`` runs the stages of ``conversion/stages.py``: resolve -> plan -> select -> passes ->
measure -> recalibrate -> report.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from torch import nn

from .conversion import stages
from .conversion.result import ConversionResult
from .core.errors import SurgeryError
from .core.options import SurgeryOptions, Target
from .data.dataset import Dataset
from .io.saving import METADATA, load_weights, read_surgery_json
from .models.inputs import ExampleInputs, Inputs
from .models.zoo import SOURCE_ATTRIBUTE, load_model, model_from_source, parse_model_spec

__all__ = ["convert", "load_converted"]


def convert(
    model: Union[nn.Module, str],
    options: Union[str, SurgeryOptions] = "u",
    *,
    example_inputs: Inputs = None,
    calibration: Union[Dataset, str, Any, None] = None,
    target: Union[Target, dict, None] = None,
    recalibrate_bn: bool = False,
    output: Union[int, str, None] = None,
    metric: Union[str, Callable, None] = None,
    count: bool = True,
    memory_check: bool = True,
    **option_keywords: Any,
) -> ConversionResult:
    """Convert ``model`` in place and report what changed.

    ``model`` is an ``nn.Module`` (from ``load_model`` to carry its spec and weights' provenance,
    or any module of yours), or a spec such as ``"timm:resnet18"`` (``load_model(spec)``).
    ``options`` is ``"u"`` (standard convs and depthwise-separable pairs -> BSConv-U) or ``"s"``
    (standard convs -> BSConv-S, linear bottlenecks -> BSConv-S projections), with the options as
    keywords (``kernel_sizes``, ``include``/``exclude``, ``types``, ``p``, ``with_bn``,
    ``min_mid_channels``, ``init``, ``allow_growth``), or a ``SurgeryOptions``. ``init="auto"``
    (the default) is ``svd`` when the model carries trained weights, else ``default``.
    ``example_inputs``: a tensor, a tuple of the model's arguments, or an ``ExampleInputs``
    (default: the model's family at its default input size). ``calibration`` (a ``Dataset``, a
    named set such as ``"digits"``, or any iterable of batches) measures fidelity
    (``report.fidelity``); ``output`` picks the decision output of a multi-output model.
    ``target`` (``Target(macs=0.5)``, ``{"params": "2.5M"}``) converts the sites that reach the
    budget with the least measured loss (``report.selection``): by default the decision output's
    disagreement plus a divergence suited to its head; ``metric`` picks another (``relative-error``,
    ``kl``, ``bce``, ``disagreement``) or is your callable ``metric(reference_outputs,
    converted_outputs) -> float`` (``recovery/losses.py``). ``recalibrate_bn`` re-estimates
    BatchNorm statistics on the calibration data and keeps them only if that lowers the loss
    (``report.recalibration``). An input whose forward pass cannot fit in memory is refused unless
    ``memory_check=False``.

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    >>> result = bs.convert(net, "u", example_inputs=torch.randn(1, 3, 16, 16))
    >>> [record.name for record in result.report.replaced], type(net[2]).__name__
    (['0', '2'], 'BSConvU')
    """
    if isinstance(model, str):
        model = load_model(model)
    started = time.perf_counter()
    job = stages.resolve(model, options, option_keywords, example_inputs, calibration, target, recalibrate_bn,
                         output, count, memory_check, metric)
    original = stages.plan(job)
    selection = stages.select(job, original)
    opts = dataclasses.replace(job.options, sites=tuple(selection.sites)) if selection is not None else job.options
    passes = stages.run_passes(job.model, opts, job.inputs)
    measurement = stages.measure(job, original, passes)
    recalibration = stages.recalibrate(job, original, measurement)
    report = stages.build_report(job, original, selection, passes, measurement, recalibration, started)
    return ConversionResult(job.model, report, opts, job.source, job.inputs)


def load_converted(directory: Union[str, Path], model: Optional[nn.Module] = None,
                   trust_code: bool = False) -> ConversionResult:
    """Rebuild a conversion saved by ``convert --out DIR`` (or ``ConversionResult.save``): the
    source model is built from the saved spec (or ``model``, a module you built the same way as the
    one converted), the same surgery runs on it at the saved example inputs (family and size, so
    the growth guard sees the conv sizes the conversion saw), and the saved weights load strictly,
    so the model computes exactly what was saved. A spec that runs your own code (``py:`` /
    ``file:``) is rebuilt only with ``trust_code=True``, from an unchanged file. The result carries
    the saved report, options, source and inputs.

    >>> import tempfile, torch, bsconv_surgery as bs
    >>> model = bs.load_model("timm:test_resnet", num_classes=3).eval()
    >>> result = bs.convert(model, "u", example_inputs=(3, 32, 32))
    >>> x = torch.randn(2, 3, 32, 32)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = result.save(folder + "/converted")
    ...     again = bs.load_converted(folder + "/converted")
    >>> torch.equal(again.model.eval()(x), result.model(x))
    True
    >>> again.source.spec, again.input_size
    ('timm:test_resnet', (3, 32, 32))
    """
    saved = read_surgery_json(directory)
    if model is None:
        rebuilt = model_from_source(saved.source, trust_code=trust_code)  # the architecture only
    elif not isinstance(model, nn.Module):
        raise SurgeryError(f"model must be an nn.Module built as the converted one was, not {type(model).__name__}.")
    else:
        rebuilt = model
    setattr(rebuilt, SOURCE_ATTRIBUTE, saved.source)
    family = saved.report.input_family or None
    spec_family = parse_model_spec(saved.source.spec).family if saved.source.spec is not None else None
    inputs = ExampleInputs.of(family or spec_family, saved.input_size)
    # the weights are loaded below: no need to initialise the converted sites from the source's.
    # Exactly the saved sites are converted again, whatever guards this version adds (growth).
    sites = tuple(record.name for record in saved.report.replaced)
    rebuild = dataclasses.replace(saved.options, init="default", allow_unmatched=True, allow_growth=True, sites=sites)
    try:
        stages.run_passes(rebuilt, rebuild, inputs)
    except SurgeryError as exc:
        raise SurgeryError(f"'{saved.directory / METADATA}' does not rebuild the model it saved: {exc}") from None
    load_weights(rebuilt, saved)
    return ConversionResult(rebuilt, saved.report, saved.options, saved.source, inputs)

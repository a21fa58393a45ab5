"""``prepare_for_inference``: a (converted) model made ready to run fast, by a named preparation
(``preps.py``: eager, fused, channels_last, compiled, aot), the fastest one measured on the
example input (``prep="auto"``, the default), or the keyword flags of earlier versions (eval
mode, BatchNorm folding, lowering of the BSConv steps, channels_last, ``torch.compile`` with
frozen weights)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

from torch import nn

from .compiled import AOTCompiled, CompiledForInference, channels_last_input, compiler_available
from .preps import AUTO, Preparation, apply_preparation, choose_preparation, preparation_from_flags, resolve_preparation

__all__ = ["prepare_for_inference", "CompiledForInference", "AOTCompiled", "compiler_available", "channels_last_input"]

_UNSET: Any = object()


def prepare_for_inference(
    model: nn.Module,
    fuse: bool = _UNSET,
    channels_last: bool = _UNSET,
    compile: bool = _UNSET,
    compile_options: Optional[Dict[str, Any]] = _UNSET,
    report: Optional[Dict[str, Any]] = None,
    lower: Optional[bool] = _UNSET,
    *,
    prep: Union[str, Preparation, None] = None,
    example_input: Any = None,
    candidates: Optional[Sequence[str]] = None,
    cache: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> nn.Module:
    """Prepare ``model`` for inference and return the module to run.

    ``prep`` names a preparation (``eager``, ``fused``, ``channels_last``, ``compiled``, ``aot``;
    see ``inference/preps.py``) or ``"auto"``: every available candidate is prepared on a copy
    and timed on ``example_input`` (a tensor or a tuple of arguments), and the fastest is
    returned (never one measured slower than eager fused; the choice is cached on disk unless
    ``cache=False``; ``candidates`` restricts the names tried; ``log`` hears the progress).
    Without ``example_input``, ``auto`` cannot measure and picks ``channels_last`` (the eager
    preparation that is never slower here), as does a call with nothing given at all.

    The keyword flags of earlier versions still work and take precedence: ``fuse`` (default
    on), ``channels_last``, ``lower`` (default: when compiling), ``compile`` (inductor with
    frozen weights, ``CompiledForInference``) and ``compile_options`` (inductor options).

    A named preparation or the flags change ``model`` in place (``copy.deepcopy`` it first to
    keep the original) and return it, or its compiled wrapper; ``auto`` leaves ``model`` as it
    is. Feed a channels_last preparation ``channels_last_input(x)`` (the compiled wrappers
    convert their input themselves). ``report`` receives the folding and lowering reports under
    ``fold`` / ``lower`` and the preparation under ``prep`` (with ``auto``: the candidates'
    median latencies and the choice).

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(bs.BSConvU(3, 8, 3, with_bn=True), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    >>> x = torch.randn(1, 3, 16, 16)
    >>> expected = net(x)
    >>> fast = bs.prepare_for_inference(net, prep="fused")  # both BatchNorms folded into the convs
    >>> type(fast[0].bn).__name__, type(fast[1]).__name__, torch.allclose(fast(x), expected, atol=1e-5)
    ('Identity', 'Identity', True)
    """
    flags = {k: v for k, v in (("fuse", fuse), ("channels_last", channels_last), ("compile", compile),
                               ("lower", lower), ("compile_options", compile_options)) if v is not _UNSET}
    if flags:
        if prep is not None:
            raise TypeError("give either prep= or the keyword flags (fuse, channels_last, compile, lower, "
                            "compile_options), not both")
        chosen = preparation_from_flags(fuse=flags.get("fuse", True), channels_last=flags.get("channels_last", False),
                                        compile=flags.get("compile", False), lower=flags.get("lower"),
                                        compile_options=flags.get("compile_options"))
    elif prep is None or prep == AUTO:
        if example_input is None:
            chosen = resolve_preparation("channels_last")
        else:
            prepared, chosen = choose_preparation(model, example_input, candidates=candidates, cache=cache,
                                                  report=report, log=log)
            return prepared
    else:
        chosen = prep if isinstance(prep, Preparation) else resolve_preparation(prep)
    prepared = apply_preparation(model, chosen, example_input, report=report)
    if report is not None:
        report["prep"] = {"auto": False, "chosen": chosen.name, "label": chosen.label}
    return prepared

"""Compiled forms of a prepared model: ``CompiledForInference`` (inductor with frozen weights,
compiled at the first call for each input shape) and ``AOTCompiled`` (an AOTInductor package
wrapped as a module).

``CompiledForInference`` captures the model with ``torch.export`` and compiles that graph with
inductor directly (``torch._inductor.compile``, with a C++ wrapper), so a call runs the compiled
code without dynamo: no guard evaluation per call and no dynamo cache shared between models of
one class.
The dynamo path cost a fixed amount per call, which weighs on a small converted model and hardly
on its original: guard evaluation (the profiler's "TorchDynamo Cache Lookup", 0.22 ms per call for
a compiled ResNet-18 at one thread) and inductor's Python wrapper around the kernels, together
about 8% of the converted ResNet-18's 8 ms at batch 1 against 2% of the original's 28 ms
(``benchmarks/results/compile_paths.md``). Models that
``torch.export`` cannot capture fall back to ``torch.compile`` (dynamo, graph breaks allowed).
"""

from __future__ import annotations

import shutil
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..core.errors import describe_exception

__all__ = ["compiler_available", "channels_last_input", "CompiledForInference", "AOTCompiled", "input_key",
           "COMPILER_HINT"]

#: How to get what ``compiler_available`` looks for.
COMPILER_HINT = "install one (Debian/Ubuntu: apt install g++; conda: conda install -c conda-forge gxx)"


def compiler_available() -> bool:
    """Inductor's CPU backend needs a C++ compiler."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def channels_last_input(x: Any) -> Any:
    """A 4-D tensor in channels_last memory format (others unchanged); a tuple of arguments
    element by element."""
    if isinstance(x, tuple):
        return tuple(channels_last_input(a) for a in x)
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def input_key(args: tuple) -> tuple:
    """What a compiled graph is specialised on: each tensor argument's shape, strides, dtype and
    device (other arguments by type and value)."""
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else (type(a), a)
                 for a in args)


class _Wrapper(nn.Module):
    """What the compiled wrappers share: the wrapped model as ``model`` (eval mode, its
    attributes reachable through the wrapper) and channels_last conversion of 4-D inputs when
    the model was prepared for it."""

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.training = model.training

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def _inputs(self, args: tuple) -> tuple:
        return channels_last_input(args) if self.channels_last else args


class CompiledForInference(_Wrapper):
    """``model`` compiled by inductor with its weights frozen (constants of the compiled code:
    prepacked oneDNN/MKL weights, constant folding), under ``torch.inference_mode()``.

    Compiled at the first call for each input shape (``input_key``): the model is captured with
    ``torch.export`` and the graph compiled with ``torch._inductor.compile`` with inductor's
    ``freezing`` flag set (``torch.compile(options={"freezing": True})`` alone freezes nothing,
    torch 2.14). A model that ``torch.export`` cannot capture is compiled with ``torch.compile``
    instead (dynamo: graph breaks allowed, guards checked per call); ``backend`` says which one
    was used. Later changes to the model's weights are not seen by compiled code.
    """

    def __init__(self, model: nn.Module, options: Optional[Dict[str, Any]] = None, freezing: bool = True,
                 channels_last: bool = False, use_export: bool = True) -> None:
        super().__init__(model, channels_last)
        self.options = dict(options or {})
        self.freezing = freezing
        self.use_export = use_export
        self.backend: Optional[str] = None  # "export+inductor" or "dynamo", once compiled
        self.export_failure: Optional[str] = None
        self._compiled: Dict[tuple, Callable] = {}
        self._dynamo: Optional[Callable] = None

    def _compile(self, args: tuple) -> Callable:
        # inductor: compile-only machinery, imported when a model is first compiled
        import torch._inductor
        import torch._inductor.config as inductor_config

        if self.use_export and self.export_failure is None:
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = torch.export.export(self.model, args).module()
            except Exception as exc:  # graph breaks, data-dependent control flow, ...
                self.export_failure = describe_exception(exc)
            else:
                # a C++ wrapper (as AOTInductor's) calls the kernels without Python in between: about
                # 2% of a batch-1 ResNet-18; a graph it cannot handle is compiled with the Python one
                attempts = [{"cpp_wrapper": True, **self.options}, self.options] if "cpp_wrapper" not in self.options \
                    else [self.options]
                for i, options in enumerate(attempts):
                    try:
                        with torch.no_grad(), inductor_config.patch(freezing=self.freezing), \
                                warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            fn = torch._inductor.compile(graph, list(args), options=options or None)
                    except Exception:
                        if i + 1 == len(attempts):
                            raise
                        continue
                    self.backend = "export+inductor" + (" (C++ wrapper)" if options.get("cpp_wrapper") else "")
                    return fn
        if self._dynamo is None:
            self._dynamo = torch.compile(self.model, options=self.options or None)
        self.backend = "dynamo"
        return self._dynamo

    def forward(self, *args: Any) -> Any:
        # inductor's config: compile-only machinery, imported when a compiled model first runs
        import torch._inductor.config as inductor_config

        args = self._inputs(args)
        key = input_key(args)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = self._compile(args)
        if fn is self._dynamo:  # dynamo reads the freezing flag when it traces, at a call
            with torch.inference_mode(), inductor_config.patch(freezing=self.freezing):
                return fn(*args)
        with torch.inference_mode():
            return fn(*args)

    @property
    def compiled_shapes(self) -> Tuple[tuple, ...]:
        return tuple(self._compiled)


class AOTCompiled(_Wrapper):
    """An AOTInductor package (``compile_aot``) as a module: ``runner`` is the loaded package,
    specialised on the example input's shape (and strides); ``model`` the module it was compiled
    from."""

    def __init__(self, model: nn.Module, runner: Callable, channels_last: bool = False) -> None:
        super().__init__(model, channels_last)
        self.runner = runner

    def forward(self, *args: Any) -> Any:
        with torch.inference_mode():
            return self.runner(*self._inputs(args))

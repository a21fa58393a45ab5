"""Inference preparation and export of (converted) models.

``fold_batchnorm`` folds every eval-mode BatchNorm that directly follows a convolution into
that convolution: the conv's weights are scaled per output channel and it gets a bias, the
BatchNorm becomes ``nn.Identity`` (or its fused activation, for timm's ``BatchNormAct2d``).
Pairs are found in the FX graph (the conv's output must feed only the BatchNorm, and both must
be called exactly once), and modules are swapped on the eager model by qualified name, so the
result is the user's own module, not a ``GraphModule``. This covers the BatchNorm after a
depthwise step, the optional one between BSConv-U's pointwise and depthwise steps
(``with_bn``), and the BatchNorms after plain and pointwise convs of the original model.

``prepare_for_inference`` = eval mode + folding + optional lowering of the BSConv blocks
(``lowering.py``) + optional channels_last + optional ``torch.compile`` with weight freezing.
``export_onnx`` / ``onnx_parity`` / ``export_program`` export a model and
check the exported one against eager PyTorch; ``compile_aot`` compiles it ahead of time
(AOTInductor ``.pt2`` package).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from .discovery import conv_kind, conv_maths
from .errors import SurgeryError, describe_exception
from .lowering import lower_bsconv
from .passes.base import swap_module
from .tracing import FROZEN_BATCHNORM_NAMES, TraceResult, module_call_counts, trace_graph

__all__ = [
    "FoldReport",
    "fold_batchnorm",
    "prepare_for_inference",
    "CompiledForInference",
    "compiler_available",
    "channels_last_input",
    "export_onnx",
    "onnx_parity",
    "export_program",
    "compile_aot",
    "relative_error",
]

# Conv maths whose weights can absorb a per-output-channel scale exactly: a plain conv and
# timm's Conv2dSame (it only pads). Weight-standardised convs re-normalise the scaled weights.
_FOLDABLE_MATHS = {"plain", "same"}
_ACT_BN_NAMES = {"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}


@dataclass
class FoldReport:
    """What ``fold_batchnorm`` did: folded pairs and the BatchNorms it left alone (with why)."""

    folded: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    method: str = "fx"
    trace_error: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "trace_error": self.trace_error,
            "folded": self.folded,
            "skipped": self.skipped,
            "by_kind": self.by_kind(),
        }

    def by_kind(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for rec in self.folded:
            out[rec["conv_kind"]] = out.get(rec["conv_kind"], 0) + 1
        return out


def _bn_kind(module: nn.Module) -> Optional[str]:
    """``plain`` / ``act`` (BatchNorm with a fused drop + activation) for a foldable 2-d
    BatchNorm class, else ``None``."""
    cls = type(module)
    name = cls.__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if name in _ACT_BN_NAMES and hasattr(module, "act"):
            return "act"
        if cls.forward in (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward):
            return "plain"
        return None  # a subclass with its own forward: unknown maths
    if name in FROZEN_BATCHNORM_NAMES and all(hasattr(module, a) for a in ("weight", "bias", "running_mean", "running_var")):
        return "act" if name in _ACT_BN_NAMES and hasattr(module, "act") else "plain"
    return None


def _bn_unfoldable(bn: nn.Module) -> Optional[str]:
    frozen = type(bn).__name__ in FROZEN_BATCHNORM_NAMES  # running statistics in every mode
    if getattr(bn, "training", False) and not frozen:
        return "in training mode (batch statistics); call model.eval() first"
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "has no running statistics (track_running_stats=False uses batch statistics)"
    return None


def _conv_unfoldable(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    if not isinstance(conv, nn.Conv2d):
        return f"its input comes from {type(conv).__name__}, not a Conv2d"
    if conv_maths(conv) not in _FOLDABLE_MATHS:
        return f"{type(conv).__name__} computes its own weights ({conv_maths(conv)}); a scale cannot be folded into them"
    if conv.out_channels != bn.running_mean.numel():
        return "the conv's output channels and the BatchNorm's features differ"
    return None


def _folded_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A copy of ``conv`` computing ``bn(conv(x))`` (eval-mode BatchNorm)."""
    new = copy.deepcopy(conv)
    with torch.no_grad():
        var = bn.running_var.to(torch.float64)
        mean = bn.running_mean.to(torch.float64)
        gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
        scale = gamma * torch.rsqrt(var + bn.eps)
        bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(mean)
        weight = conv.weight.to(torch.float64) * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        new.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        new.bias = nn.Parameter(((bias - mean) * scale + beta).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return new


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or its activation (timm ``BatchNormAct2d``)."""
    if _bn_kind(bn) != "act":
        return nn.Identity()
    drop = getattr(bn, "drop", None)
    act = bn.act
    if drop is None or isinstance(drop, nn.Identity):
        return act
    return nn.Sequential(drop, act)


def _fx_pairs(model: nn.Module, report: FoldReport) -> Optional[List[Tuple[str, str]]]:
    """``(conv_name, bn_name)`` pairs from the FX graph; ``None`` when the model does not trace."""
    trace = TraceResult(*trace_graph(model))
    if not trace.ok:
        report.trace_error = trace.error
        return None
    modules = dict(model.named_modules())
    calls = module_call_counts(trace)
    pairs = []
    for node in trace.module_nodes():
        bn = modules.get(node.target)
        if bn is None or _bn_kind(bn) is None:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            report.skipped.append({"bn": node.target, "reason": "called with more than one input"})
            continue
        src = node.args[0]
        if src.op != "call_module" or not isinstance(modules.get(src.target), nn.Conv2d):
            continue  # not after a conv (e.g. after an add or a pool): nothing to fold into
        if calls.get(node.target, 0) != 1 or calls.get(src.target, 0) != 1:
            report.skipped.append({"bn": node.target, "conv": src.target,
                                   "reason": "the conv or the BatchNorm is called from several places"})
            continue
        if len(src.users) != 1:
            report.skipped.append({"bn": node.target, "conv": src.target,
                                   "reason": "the conv output is also used without the BatchNorm"})
            continue
        pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """Fallback when tracing fails: a conv directly followed by a BatchNorm inside a plain
    ``nn.Sequential`` (whose forward feeds each child's output to the next one)."""
    refs: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        refs[id(m)] = refs.get(id(m), 0) + 1
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        children = list(seq.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and _bn_kind(bn) is not None and refs[id(conv)] == 1 and refs[id(bn)] == 1:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + cname, prefix + bname))
    return pairs


def fold_batchnorm(model: nn.Module) -> FoldReport:
    """Fold eval-mode BatchNorms into the convolution before them, in place.

    Each folded conv is replaced by a copy with scaled weights and a bias; the BatchNorm by
    ``nn.Identity`` (or by its activation for timm's ``BatchNormAct2d``). The outputs stay the
    same up to float rounding. BatchNorms in training mode, without running statistics, after
    a shared conv, or after a conv whose output is also used elsewhere are left alone and
    listed in the report's ``skipped``.
    """
    report = FoldReport()
    pairs = _fx_pairs(model, report)
    if pairs is None:
        report.method = "nn.Sequential fallback (FX tracing failed)"
        pairs = _sequential_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        reason = _bn_unfoldable(bn) or _conv_unfoldable(conv, bn)
        if reason:
            report.skipped.append({"bn": bn_name, "conv": conv_name, "reason": reason})
            continue
        replacement = _bn_replacement(bn)
        swap_module(model, conv_name, _folded_conv(conv, bn))
        swap_module(model, bn_name, replacement)
        report.folded.append({
            "conv": conv_name,
            "bn": bn_name,
            "conv_kind": conv_kind(conv),
            "kept": type(replacement).__name__ if not isinstance(replacement, nn.Identity) else None,
        })
    return report


def compiler_available() -> bool:
    """Inductor's CPU backend needs a C++ compiler."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class CompiledForInference(nn.Module):
    """``torch.compile(model)`` called under ``torch.inference_mode()`` with inductor's weight
    freezing on, so inductor treats the weights as constants (prepacked oneDNN weights,
    constant folding). The flag is set around every call: dynamo reads the global
    ``torch._inductor.config.freezing`` when it traces, and ``torch.compile(options=
    {"freezing": True})`` alone does not freeze anything (torch 2.14). Later changes to the
    model's weights are not seen by the compiled code."""

    def __init__(self, model: nn.Module, options: Optional[Dict[str, Any]] = None, freezing: bool = True):
        super().__init__()
        self.freezing = freezing
        self.compiled = torch.compile(model, options=options or None)
        self.training = model.training

    def __getattr__(self, name: str) -> Any:
        # like torch.compile's OptimizedModule: attributes of the wrapped model stay reachable
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("compiled")._orig_mod, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with torch.inference_mode(), inductor_config.patch(freezing=self.freezing):
            return self.compiled(*args, **kwargs)


def prepare_for_inference(
    model: nn.Module,
    fuse: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    compile_options: Optional[Dict[str, Any]] = None,
    report: Optional[Dict[str, Any]] = None,
    lower: Optional[bool] = None,
) -> nn.Module:
    """Put ``model`` in eval mode, fold its BatchNorms (``fuse``), lower its BSConv blocks for
    the compiler (``lower``; by default when compiling, see ``lowering.lower_bsconv``),
    optionally convert it to channels_last (feed it ``channels_last_input(x)`` too) and wrap it
    with ``torch.compile`` (inductor with weight freezing, as ``CompiledForInference``).

    The model is changed in place (``copy.deepcopy`` it first to keep the original); the
    return value is the model, or its compiled wrapper. Pass a dict as ``report`` to receive
    the folding and lowering reports under ``report["fold"]`` and ``report["lower"]``.
    """
    model.eval()
    if fuse:
        folded = fold_batchnorm(model)
        if report is not None:
            report["fold"] = folded.as_dict()
    if lower is None:
        lower = compile
    if lower:
        lowered = lower_bsconv(model)
        if report is not None:
            report["lower"] = lowered.as_dict()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cpu" and not compiler_available():
            raise SurgeryError(
                "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one "
                "or leave out --compile."
            )
        options = dict(compile_options or {})
        model = CompiledForInference(model, options, freezing=options.pop("freezing", True))
    return model


# ---------------------------------------------------------------------------------- export


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / max |e|`` (the scale-free error used by the parity checks)."""
    actual = torch.as_tensor(actual).detach().to(torch.float64)
    expected = torch.as_tensor(expected).detach().to(torch.float64)
    denom = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / denom)


def _onnxscript_available() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(
    model: nn.Module,
    path: Union[str, Path],
    example_input: torch.Tensor,
    *,
    dynamo: Optional[bool] = None,
    dynamic_batch: bool = True,
    opset_version: Optional[int] = None,
) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path``, input ``input``, output ``output``.

    ``dynamo=None`` uses the torch.export-based exporter when ``onnxscript`` is installed and
    the TorchScript-based one otherwise. ``dynamic_batch`` makes the batch dimension symbolic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dynamo is None:
        dynamo = _onnxscript_available()
    model.eval()
    kwargs: Dict[str, Any] = {"input_names": ["input"], "output_names": ["output"], "dynamo": dynamo}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if dynamic_batch:
        if dynamo:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        else:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    if dynamo:
        kwargs["verbose"] = False
        kwargs["external_data"] = False
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_input,), str(path), **kwargs)
    except ImportError as exc:
        raise SurgeryError(
            f"ONNX export needs the optional 'export' extra ({exc}); install it with "
            "pip install 'bsconv-surgery[export]'."
        ) from exc
    return path


def onnx_parity(model: nn.Module, path: Union[str, Path], inputs: Sequence[torch.Tensor]) -> float:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) on each input; return the largest
    relative error against eager ``model``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SurgeryError("Checking an ONNX export needs onnxruntime: pip install 'bsconv-surgery[export]'.") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    model.eval()
    for x in inputs:
        with torch.no_grad():
            expected = model(x)
        (actual,) = session.run(None, {name: x.detach().cpu().numpy()})[:1]
        worst = max(worst, relative_error(torch.from_numpy(actual), expected))
    return worst


def export_program(model: nn.Module, example_input: torch.Tensor, dynamic_batch: bool = False):
    """``torch.export.export`` of ``model`` in eval mode (an ``ExportedProgram``)."""
    model.eval()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (example_input,), dynamic_shapes=dynamic_shapes)


def compile_aot(
    model: nn.Module,
    example_input: torch.Tensor,
    package_path: Optional[Union[str, Path]] = None,
    *,
    dynamic_batch: bool = False,
    options: Optional[Dict[str, Any]] = None,
):
    """Compile ``model`` ahead of time with AOTInductor and return the loaded package.

    The model is exported (``export_program``), compiled with its weights frozen into a
    ``.pt2`` package (written atomically to ``package_path``; to a temporary file when that is
    ``None``) and loaded back: a callable that runs without dynamo's guards or a Python
    wrapper, and the package loads in C++ (``torch::inductor::AOTIModelPackageLoader``) too.
    Prepare the model first (``prepare_for_inference(model, channels_last=True, lower=True)``
    and a channels_last ``example_input``); the input shape is fixed unless ``dynamic_batch``.
    """
    import torch._inductor
    import torch._inductor.config as inductor_config

    from .saving import atomic_file

    if example_input.device.type == "cpu" and not compiler_available():
        raise SurgeryError("AOTInductor on CPU needs a C++ compiler (g++ or clang++) on PATH.")
    settings = {"freezing": True, **(options or {})}
    # freezing applies only with grad disabled, during the export and the compile alike
    with tempfile.TemporaryDirectory(prefix="bsconv-aoti-") as tmp, torch.no_grad():
        try:
            program = export_program(model, example_input, dynamic_batch=dynamic_batch)
        except Exception as exc:
            raise SurgeryError(
                f"torch.export could not capture {type(model).__name__} for AOTInductor "
                f"({describe_exception(exc)}); use torch.compile (--compile) instead."
            ) from exc
        target = Path(package_path) if package_path is not None else Path(tmp) / "model.pt2"
        with atomic_file(target) as partial, inductor_config.patch(freezing=settings.pop("freezing")), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=settings)
        return torch._inductor.aoti_load_package(str(target))

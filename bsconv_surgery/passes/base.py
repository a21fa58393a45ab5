"""The pass template (HF optimum's ``Transformation`` in small) and the context passes share.

A pass is one class with a ``kind`` (its name in reports, e.g. ``conv->bsconv_u``) and three
steps that ``transform`` runs in order:

1. ``match(model, ctx)`` yields *sites*: small objects with a ``name`` (and whatever ``swap``
   needs), found in the graph or the module tree;
2. ``guard(model, site, ctx)`` returns why a site is left alone, or ``None``; every site is
   guarded before anything changes, and a refused site becomes a ``SkipRecord``; a site the
   guard lets through but that is not in ``options.sites`` (an exact list, e.g. a budget's
   choice) is skipped as "not in the selected set";
3. ``swap(model, site, ctx)`` replaces modules of the eager model by qualified name and returns
   a ``SiteRecord``; ``ctx.mark`` then claims those modules (later passes leave them alone),
   adds the record to ``ctx.replaced`` and puts it on the graph nodes that call them
   (``node.meta[SITE_KEY]``).

``preserves_computation`` says whether the model computes the same function afterwards (up to
float rounding); the pass table test checks it on real models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set

from torch import fx, nn

from ..fx.discovery import ConvInfo, Discovery, discover
from ..fx.shapes import conv_call_sizes
from ..fx.tracing import TraceResult, trace_model
from ..models.inputs import ExampleInputs, Inputs, as_example_inputs
from ..core.options import SurgeryOptions
from ..core.records import SiteRecord, SkipRecord

__all__ = ["SITE_KEY", "NOT_SELECTED", "SurgeryContext", "SurgeryPass", "conv_record"]

#: ``node.meta`` key of the ``SiteRecord`` of the site a node's module belongs to.
SITE_KEY = "bsconv_site"
#: The skip reason of a candidate left out by an exact site list (``SurgeryOptions.sites``).
NOT_SELECTED = "not in the selected set"


@dataclass
class SurgeryContext:
    """What the passes share: the graph and the conv facts (``trace``/``discovery``; ``None`` for
    passes that walk the module tree), the options, the modules claimed so far, and the records.
    ``inputs`` says how the model is fed, so ``call_sizes`` can find the spatial sizes of the convs
    (``None``: unknown, and MAC-based guards are not applied)."""

    trace: Optional[TraceResult] = None
    discovery: Optional[Discovery] = None
    options: SurgeryOptions = field(default_factory=SurgeryOptions)
    claimed: Set[str] = field(default_factory=set)
    replaced: List[SiteRecord] = field(default_factory=list)
    skipped: List[SkipRecord] = field(default_factory=list)
    inputs: Optional[ExampleInputs] = None
    _nodes: Optional[Dict[str, List[fx.Node]]] = field(default=None, init=False, repr=False)
    _sized: bool = field(default=False, init=False, repr=False)

    @classmethod
    def for_model(cls, model: nn.Module, options: Optional[SurgeryOptions] = None,
                  inputs: Inputs = None) -> "SurgeryContext":
        """Trace ``model``, discover its convs, check the options' scope against them (a pattern that
        matches no conv is an error unless ``allow_unmatched``), and start with nothing claimed; with
        example ``inputs`` the convs' spatial sizes can be found."""
        trace = trace_model(model)
        options = options if options is not None else SurgeryOptions()
        discovery = discover(model, trace)
        options.scope.check(info.name for info in discovery.convs.values())
        return cls(trace, discovery, options, inputs=as_example_inputs(inputs) if inputs is not None else None)

    def call_sizes(self, model: nn.Module, info: ConvInfo) -> Optional[list]:
        """``(input, output)`` spatial sizes of each call of the conv ``info`` (``info.call_sizes``),
        found for every standard and depthwise conv on the first request (one forward pass on fake tensors,
        ``fx/shapes.py``; the passes do not change any conv's spatial sizes); ``None`` when unknown."""
        if not self._sized and self.inputs is not None and self.discovery is not None:
            self._sized = True
            names = [c.name for c in self.discovery.convs.values()
                     if c.kind in ("standard", "depthwise") and not c.hidden]
            for name, sizes in conv_call_sizes(model, names, self.inputs).items():
                self.discovery.convs[name].call_sizes = sizes
        return info.call_sizes

    @property
    def graph(self) -> Optional[fx.Graph]:
        """The whole model's graph (``None`` when only parts of it traced)."""
        return self.trace.graph if self.trace is not None else None

    def graphs(self) -> List[fx.Graph]:
        """The graphs of every traced part (the whole model's alone when it traced whole); their
        nodes name modules by qualified name in the model."""
        return self.trace.graphs() if self.trace is not None else []

    def mark(self, record: SiteRecord) -> None:
        """A site was swapped: claim its modules, keep its record, and put the record on the
        nodes that call those modules."""
        names = record.module_names
        self.claimed.update(names)
        self.replaced.append(record)
        if self._nodes is None:
            self._nodes = self.trace.nodes_by_module() if self.trace is not None else {}
        for name in names:
            for node in self._nodes.get(name, ()):
                node.meta[SITE_KEY] = record


class SurgeryPass:
    """The template: subclasses give ``kind``, ``match``, ``guard`` and ``swap``."""

    kind: str = ""
    preserves_computation: bool = False

    def match(self, model: nn.Module, ctx: SurgeryContext) -> Iterable[Any]:
        """The candidate sites, each with a ``name``."""
        raise NotImplementedError

    def guard(self, model: nn.Module, site: Any, ctx: SurgeryContext) -> Optional[str]:
        """Why ``site`` is left alone, or ``None`` to swap it."""
        return None

    def swap(self, model: nn.Module, site: Any, ctx: SurgeryContext) -> SiteRecord:
        """Replace the site's modules on ``model``; the record of what changed."""
        raise NotImplementedError

    def skip_record(self, site: Any, reason: str) -> SkipRecord:
        return SkipRecord(site.name, self.kind, reason)

    def transform(self, model: nn.Module, ctx: SurgeryContext) -> None:
        """Match every site, guard every site, then swap the ones the guards let through (nothing
        when the options' scope leaves out this pass's type of site)."""
        if not ctx.options.selects_type(self.kind):
            return
        accepted = []
        for site in list(self.match(model, ctx)):
            reason = self.guard(model, site, ctx)
            if reason is None and not ctx.options.in_selected_set(site.name):
                reason = NOT_SELECTED
            if reason is None:
                accepted.append(site)
            else:
                ctx.skipped.append(self.skip_record(site, reason))
        for site in accepted:
            ctx.mark(self.swap(model, site, ctx))


def conv_record(kind: str, info: ConvInfo, params_before: int, params_after: int, **details: Any) -> SiteRecord:
    """The record of a site named after one conv, with that conv's shape."""
    return SiteRecord(info.name, kind, info.cls, info.in_channels, info.out_channels, list(info.kernel_size),
                      list(info.stride), params_before, params_after, info.calls, details=details)

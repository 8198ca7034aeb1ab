"""Automatic per-layer choices: which scheme each layer gets, and which layers stay at more bits
or in float, from the model's output error each one causes alone (contribution.py).

Candidates per layer: the requested scheme at ``bits`` (with ``auto_scheme``: per channel and
blocks of 32 inputs, each symmetric and asymmetric); with a budget or an error target also the
requested scheme at 8 bits (with a bits-per-weight target, at every width from ``bits + 1`` to
``ceil(target) + 1`` as well), and float. A bits-per-weight target is a size budget on the
quantized layers' bytes (codes, scales and zero points as stored). Each
scheme is solved once for all layers; every candidate's contribution is measured alone in
onnxruntime. Contributions of different layers are taken to add in squares (independent
perturbations of the output), so the model's error is estimated as ``sqrt(sum e_i^2)``. The
choice is greedy by error removed per byte added: from the cheapest candidate of each layer,
take the upgrade with the most ``(e_old^2 - e_new^2) / (bytes_new - bytes_old)`` while the size
budget allows, until the estimate meets ``max_error``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .config import PerBlock, PerChannel, QuantizeConfig
from .core.errors import OptionError
from .core.progress import Progress
from .core.report import LayerReport
from .core.types import QuantizedLayer, SkippedNode
from .evaluation.verify import Reference, reference_scores
from .pipeline import Calibrated, Quantized, finish
from .plan import make_plan
from .studies.contribution import FLOAT_BYTES, LayerSensitivity, measure

AUTO_BLOCK = 32  # the block size --auto-scheme tries beside per channel
PROMOTED_BITS = 8


@dataclass(frozen=True, eq=False)
class Candidate:
    """One way to store one layer: its integers (None: float), its contribution and its bytes."""

    quantized: QuantizedLayer | None
    report: LayerReport | None
    sensitivity: LayerSensitivity  # the float candidate's: error 0, the float weight's bytes
    error: float
    bytes: int


@dataclass(frozen=True, eq=False)
class Choice:
    """The chosen candidate per layer (graph order) and the estimate behind the choice."""

    chosen: list[Candidate]
    candidates: list[list[Candidate]]
    estimated_error: float
    weight_bytes: int  # of the chosen candidates

    @property
    def quantized(self) -> list[QuantizedLayer]:
        return [c.quantized for c in self.chosen if c.quantized is not None]

    @property
    def reports(self) -> list[LayerReport]:
        return [c.report for c in self.chosen if c.report is not None]

    @property
    def kept_float(self) -> list[str]:
        return [c.sensitivity.name for c in self.chosen if c.quantized is None]

    def summary(self) -> str:
        """What was chosen, in one line for the report."""
        counts: dict[str, int] = {}
        for c in self.chosen:
            label = "float" if c.quantized is None else f"{c.sensitivity.bits} bits {c.sensitivity.scheme}"
            counts[label] = counts.get(label, 0) + 1
        kinds = ", ".join(f"{n} at {label}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        weights = sum(c.sensitivity.float_bytes for c in self.chosen) // FLOAT_BYTES
        return (f"automatic choice from each layer's output error alone (calibration data): {kinds}; "
                f"estimated output error {self.estimated_error:.3g}, weights {self.weight_bytes:,} bytes "
                f"({8 * self.weight_bytes / max(weights, 1):.3g} bits per weight, scales included)")


def candidate_options(config: QuantizeConfig, auto_scheme: bool, promote: bool) -> list[QuantizeConfig]:
    """The configs solved for all layers: the schemes at ``bits``, then (``promote``) the
    requested scheme at more bits: 8, and with a bits-per-weight target the widths up to one
    above it."""
    base = config.updated(layer_bits={}, exclude=())
    schemes = [base]
    if auto_scheme:
        schemes = [base.updated(granularity=granularity, symmetric=symmetric,
                                float_zero_points=base.weights.float_zero_points and not symmetric)
                   for granularity in (PerChannel(), PerBlock(AUTO_BLOCK)) for symmetric in (True, False)]
    if not promote:
        return schemes
    more = {PROMOTED_BITS}
    target = config.automatic.bits_per_weight
    if target is not None:
        more.update(range(config.weights.bits + 1, min(PROMOTED_BITS, math.ceil(target) + 1) + 1))
    return schemes + [base.updated(bits=bits) for bits in sorted(more) if bits > config.weights.bits]


def choose(calibrated: Calibrated, options: QuantizeConfig, reference: Reference, progress: Progress, *,
           auto_scheme: bool, size_budget: int | None, max_error: float | None, base_bytes: int,
           weights: int | None = None) -> Choice:
    """Measure every candidate of every layer and choose (``size_budget``: bytes of the whole
    model, ``base_bytes`` being what is not a quantizable weight; ``weights``: their number, when
    the budget was asked for in bits per weight)."""
    measured = [measure(calibrated, make_plan(o, calibrated.layers), reference, progress)
                for o in candidate_options(options, auto_scheme, size_budget is not None or max_error is not None)]
    candidates = []
    for k in range(len(measured[0].layers)):
        per_layer = [Candidate(m.layers[k], m.reports[k], m.sensitivities[k], m.sensitivities[k].output_error,
                               m.sensitivities[k].weight_bytes) for m in measured]
        floats = measured[0].sensitivities[k]
        per_layer.append(Candidate(None, None, replace(floats, bits=32, scheme="float", output_error=0.0,
                                                       weight_bytes=floats.float_bytes), 0.0, floats.float_bytes))
        candidates.append(per_layer)
    return greedy(candidates, size_budget, max_error, base_bytes, weights)


def greedy(candidates: list[list[Candidate]], size_budget: int | None, max_error: float | None,
           base_bytes: int, weights: int | None = None) -> Choice:
    """From each layer's cheapest candidate (least error among equals), upgrade by error removed per byte."""
    chosen = [min(cands, key=lambda c: (c.bytes, c.error)) for cands in candidates]
    if size_budget is None and max_error is None:  # --auto-scheme alone: the least error at --bits
        quantized = [[c for c in cands if c.sensitivity.bits == cands[0].sensitivity.bits] for cands in candidates]
        chosen = [min(cands, key=lambda c: (c.error, c.bytes)) for cands in quantized]
        return _choice(chosen, candidates, base_bytes)
    total = base_bytes + sum(c.bytes for c in chosen)
    if size_budget is not None and total > size_budget:
        if weights:
            raise OptionError(f"{{bits_per_weight}} {8 * (size_budget - base_bytes) / weights:.3g} is below what "
                              f"these schemes store at least ({8 * (total - base_bytes) / weights:.3g} bits per "
                              "weight, scales included)", "bits_per_weight")
        raise OptionError(f"{{size_budget}} {size_budget / 1e6:.3g} MB is below the smallest model these schemes "
                          f"make ({total / 1e6:.3g} MB)", "size_budget")
    while max_error is None or _estimate(chosen) > max_error:
        best, gain = None, 0.0
        for k, cands in enumerate(candidates):
            now = chosen[k]
            for c in cands:
                extra = c.bytes - now.bytes
                removed = now.error ** 2 - c.error ** 2
                if removed <= 0 or (size_budget is not None and total + max(extra, 0) > size_budget):
                    continue
                ratio = removed / max(extra, 1)
                if ratio > gain:
                    best, gain = (k, c), ratio
        if best is None:
            break
        k, c = best
        total += c.bytes - chosen[k].bytes
        chosen[k] = c
    return _choice(chosen, candidates, base_bytes)


def _estimate(chosen: list[Candidate]) -> float:
    return math.sqrt(sum(c.error ** 2 for c in chosen))


def _choice(chosen: list[Candidate], candidates: list[list[Candidate]], base_bytes: int) -> Choice:
    return Choice(chosen, candidates, _estimate(chosen), sum(c.bytes for c in chosen))


def quantize_auto(calibrated: Calibrated, options: QuantizeConfig, progress: Progress, *,
                  input_bytes: int) -> Quantized:
    """``pipeline.quantize_model`` with the per-layer choices made here, measured on the
    calibration data (the evaluation data stays out of the choice)."""
    reference = reference_scores(calibrated.model, calibrated.dataset, progress)
    weights = sum(math.prod(layer.shape) for layer in calibrated.layers)  # not layer.weight: no reading
    automatic = options.automatic
    base_bytes = max(input_bytes - weights * FLOAT_BYTES, 0)
    budget = None if automatic.size_budget is None else int(automatic.size_budget * 1e6)
    if automatic.bits_per_weight is not None:  # the same budget, on the quantized layers' bytes
        budget = base_bytes + int(automatic.bits_per_weight * weights / 8)
    chosen = choose(calibrated, options, reference, progress, auto_scheme=automatic.auto_scheme, size_budget=budget,
                    max_error=automatic.max_error, base_bytes=base_bytes,
                    weights=None if automatic.bits_per_weight is None else weights)
    if not chosen.quantized:  # nothing left to quantize: say which request led there
        least = min(c.error for cands in chosen.candidates for c in cands if c.quantized is not None)
        raise OptionError("every layer would stay float: {size_budget} fits the float model, or {max_error} is "
                          f"below what any quantized layer gives alone (least: {least:.3g})",
                          "size_budget", "max_error")
    skipped = calibrated.skipped + [SkippedNode(name, "", "kept float by the automatic choice")
                                    for name in chosen.kept_float]
    return finish(calibrated, chosen.quantized, chosen.reports, skipped, options.output.format,
                  options.output.ort_accuracy_level or 0, notes=[chosen.summary()],  # format ort is refused here
                  packed=options.output.pack_codes)

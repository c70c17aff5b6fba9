"""NUPES over a whole model: every decoder linear, data-free or layer by layer on calibration
data (``nupes``: the operator and the per-weight algorithms), plus the exponent histogram the
quantize report and the benchmark show."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from editcomp.errors import DataError
from editcomp.quant.nupes import NUPESConfig, nupes_quantize_weight

Codes = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _write(linear, W_hat):
    with torch.no_grad():
        linear.weight.copy_(W_hat.to(linear.weight.dtype))


def check_calibration(calib: torch.Tensor | None, config: NUPESConfig) -> None:
    """Data-driven NUPES needs ``min_calib_tokens`` calibration tokens (one-line error)."""
    if config.data_free:
        return
    if calib is None:
        raise DataError("NUPES data-driven mode needs calibration windows (or use --data-free)")
    n = int(calib.numel())
    if n < config.min_calib_tokens:
        raise DataError(f"calibration data too short for NUPES: {n} tokens "
                        f"({tuple(calib.shape)[0]} windows x {tuple(calib.shape)[-1]}), need at "
                        f"least {config.min_calib_tokens}")


def nupes_weights(model, config: NUPESConfig, calib: torch.Tensor | None = None,
                  batch_size: int = 1, progress: bool = True) -> tuple[Codes, dict]:
    """NUPES for every decoder linear; writes ``W_hat`` into the model and returns
    ``(codes {module name: (codes, scale, exponent, range code)}, report)``.

    The report holds each linear's exponents (for the histogram of ``a``) and, data-driven, the
    output errors of each stage.
    """
    from editcomp.arch import get_adapter
    from editcomp.quant.layerwise import inner_linear, layer_hessians, module_names, sequential

    check_calibration(calib, config)
    names = module_names(model)
    codes: Codes = {}
    report: dict = {"exponents": {}, "errors": {}}

    def do(name, lin, H):
        W_hat, q, s, a, info = nupes_quantize_weight(lin.weight, config, H, name=name)
        _write(lin, W_hat)
        codes[name] = (q, s, a, config.range_code)
        report["exponents"][name] = a.flatten().tolist()
        if info:
            report["errors"][name] = info

    if config.data_free:
        layers = get_adapter(model).layers()
        for parts in tqdm(layers, desc="nupes", unit="layer", disable=not progress):
            for role, slot in parts.linears().items():
                name = names[id(slot)]
                if role in config.skip or name in config.skip:
                    continue
                do(name, inner_linear(slot), None)
        return codes, report

    device = next(model.parameters()).device

    def per_layer(parts, run):
        slots = {r: m for r, m in parts.linears().items()
                 if r not in config.skip and names[id(m)] not in config.skip}
        hess = layer_hessians(slots, names, run)
        for r, m in slots.items():
            do(names[id(m)], inner_linear(m), hess[r])

    torch.manual_seed(config.seed)
    sequential(model, calib.to(device), per_layer, batch_size=batch_size, desc="nupes",
               progress=progress)
    return codes, report


def exponent_histogram(exponents: dict[str, list[float]], bins: int = 10,
                       lo: float = 0.0, hi: float = 1.0) -> list[tuple[float, float, int]]:
    """``[(left, right, count)]`` over all exponents found (per channel or per layer)."""
    vals = torch.tensor([v for vs in exponents.values() for v in vs], dtype=torch.float64)
    counts = torch.histc(vals, bins=bins, min=lo, max=hi) if vals.numel() else torch.zeros(bins)
    edges = torch.linspace(lo, hi, bins + 1)
    return [(float(edges[i]), float(edges[i + 1]), int(counts[i])) for i in range(bins)]

"""``editcomp export``: a checkpoint as a GGUF file or another deployable format."""

from __future__ import annotations

import click

from editcomp.cli.base import cli, device_option, dtype_option, emit, json_option
from editcomp.defaults import DEFAULT_CALIB
from editcomp.errors import EditcompError


@cli.command("export")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors"]),
              default="compressed-tensors", show_default=True,
              help="Output layout (compressed-tensors: what vLLM and transformers load).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--bits", default=None,
              help="Quantize a float MODEL first: w4a16, w8a16 (optionally gG, -asym) or w8a8. "
                   "Leave out to export an editcomp quantized checkpoint as it is.")
@click.option("--group-size", type=int, default=None,
              help="With --bits: weight group size (default: per output channel).")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="With --bits: round to nearest, or GPTQ on --calib.")
@click.option("--calib", type=click.Path(dir_okay=False), default=DEFAULT_CALIB,
              show_default=True, help="With --method gptq: calibration text.")
@click.option("--nsamples", default=16, show_default=True, help="Calibration windows (gptq).")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, help="Calibration sampling.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@dtype_option
@json_option
def export_cmd(model, fmt, out, bits, group_size, method, calib, nsamples, seq_len, seed, force,
               device, dtype, as_json):
    """Write MODEL in a standard quantized layout that serving engines load.

    Exportable: weight-only w4a16 / w8a16 (per channel or group, symmetric or asymmetric) and
    w8a8 (per-channel symmetric int8 weights, dynamic per-token int8 activations). Refused, with
    the reason: online Hadamards (QuaRot, OSTQuant), KV-cache quantization, 4-bit activations and
    non-uniform grids (NUPES). Scales are stored in fp32; other tensors in --dtype.

    \b
    Examples:
      editcomp export out/w4a16 --out out/w4a16-ct
      editcomp export smollm2-135m --bits w8a8 --method gptq --out out/w8a8-ct
    """
    from pathlib import Path

    from editcomp import checkpoint, models
    from editcomp.data import calibration_windows
    from editcomp.quant.export import ExportConfig, export

    config = ExportConfig(format=fmt, bits=bits, group_size=group_size, method=method,
                          nsamples=nsamples, seq_len=seq_len, seed=seed)  # checks --bits
    if Path(out).exists() and not force:
        raise EditcompError(f"{out} already exists; choose another --out or pass --force")
    src = models.resolve(model)
    config.check_source(checkpoint.read_config(src), where=str(src))  # before loading
    ck = checkpoint.load(src, device=device, dtype=dtype)
    qconfig = config.quantize_config()
    calib_ids = (calibration_windows(ck.tokenizer, calib, nsamples, seq_len, seed=seed)
                 if qconfig is not None and qconfig.needs_calibration else None)
    result = export(ck, config, out, calib=calib_ids, force=force)

    def human(r):
        click.echo(f"wrote {r['out']}  ({r['format']} {r['compressed_format']}, {r['bits']}, "
                   f"{r['quantized_linears']} quantized linears, {r['bytes'] / 2**20:.1f} MiB)")
        click.echo(f"  kept in float: {', '.join(r['ignore']) or 'nothing'}")
    emit(result, as_json, human)

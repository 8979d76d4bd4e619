"""`histo encoders`: the encoder registry, with what defines each entry's feature."""

from __future__ import annotations

import click

from histo.cli.options import emit_json, json_option


def _row(enc) -> dict:
    """One entry as shown: its input, feature definition, weights and whether it is usable here."""
    missing = enc.missing()
    status = f"refused: {enc.refused}" if enc.refused else f"needs {', '.join(missing)}" if missing else "ok"
    crop = f", centre {enc.crop_pct:.3g}" if enc.crop_pct < 1 else ""
    return {
        "name": enc.name,
        "family": enc.family,
        "summary": enc.summary,
        "input": f"{enc.input_px} px {enc.colour} at {enc.mpp:g} µm/px, {enc.interpolation}{crop}",
        "mean": list(enc.mean),
        "std": list(enc.std),
        "feature": f"{enc.feature_dim}-d, {enc.pooling}",
        "precision": enc.precision,
        "architecture": dict(enc.arch),
        "weights": enc.weights,
        "layouts": [layout.name for layout in enc.layouts],
        "status": status,
    }


@click.command("encoders")
@click.argument("names", nargs=-1)
@json_option
def encoders(names: tuple[str, ...], as_json: bool) -> None:
    """List the registered encoders (or describe NAMES): input, feature definition, weight file, status.

    Use one with `histo index --encoder NAME --weights FILE`; `needs timm` means: pip install 'histo[encoders]'.
    """
    from pathology.encoders import get_encoder
    from pathology.encoders import names as registered

    rows = [_row(get_encoder(n)) for n in (names or registered())]
    if as_json:
        emit_json({"encoders": rows})
        return
    for r in rows:
        click.echo(f"{r['name']:<21} {r['feature']}")
        click.echo(f"{'':<21} {r['summary']}; {r['status']}")
        click.echo(f"{'':<21} input {r['input']}; weights: {r['weights']}")

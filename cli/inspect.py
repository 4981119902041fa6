"""`edgecl inspect`: summarise a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonFlag, echo_json


def inspect(
    path: Annotated[Path, typer.Argument(help="Bundle folder.")],
    as_json: JsonFlag = False,
    layers: Annotated[bool, typer.Option("--layers", help="List every masked tensor.")] = False,
) -> None:
    """Model, parameters, selected elements, per-layer coverage, files, sizes and hashes."""
    from edgecl.formats.inspect import inspect_bundle

    info = inspect_bundle(path)
    if as_json:
        echo_json(info)
        return
    typer.echo(f"bundle     {info['bundle']}  (id {info['bundle_id'][:12]}, version {info['version']})")
    typer.echo(f"model      {info['model']}  input {info['input_size'][0]}x{info['input_size'][1]}, "
               f"{info['parameters']:,} parameters ({info['base_fp32_bytes'] / 1e6:.1f} MB fp32)")
    typer.echo(f"selected   {info['selected']:,} elements = {100 * info['selected_fraction']:.2f}% of all weights "
               f"(requested {100 * info['select_rate']:.2f}%), in {info['masked_tensors']} tensors")
    typer.echo(f"per step   drop rate {info['drop_rate']:.2f} -> ~{100 * info['expected_changed_fraction_per_step']:.3f}% "
               "of weights change")
    typer.echo(f"classes    {len(info['classes'])}: {', '.join(info['classes'][:8])}"
               + (" ..." if len(info["classes"]) > 8 else ""))
    if "delta_bytes" in info:
        base = max(1, info["base_fp32_bytes"])
        typer.echo("delta      all selected elements changed, no prototypes (the largest): "
                   + ", ".join(f"{k} {v / 1e3:,.1f} kB = {100 * v / base:.2f}%" for k, v in info["delta_bytes"].items())
                   + " of the fp32 base")
    profile = info["device_profile"]
    if profile:
        typer.echo(f"device     {profile.get('name', '?')}: {profile.get('execution_provider', '?')}, "
                   f"install {profile.get('ort_package', '?')}, exemplars "
                   f"{'kept' if profile.get('store_images', True) else 'never stored'}"
                   + (f"; {profile['notes']}" if profile.get("notes") else ""))
    typer.echo(f"base sha   {info['base_sha256']}")
    typer.echo(f"mask sha   {info['mask_sha256']}")
    rows = info["layers"] if layers else sorted(info["layers"], key=lambda r: -r["selected"])[:5]
    typer.echo("coverage   " + ("" if layers else "(top 5 tensors by selected count; --layers for all)"))
    for row in rows:
        typer.echo(f"  {row['name']:<48} {row['selected']:>9,}  {100 * row['coverage']:6.2f}%  {row['shape']}")
    typer.echo("files")
    for name, entry in info["files"].items():
        status = "" if "ok" not in entry else ("  sha256 ok" if entry["ok"] else "  SHA256 MISMATCH")
        typer.echo(f"  {name:<26} {entry['bytes']:>12,} B{status}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)

"""The CLI's shared vocabulary: choice enums and JSON output, so every command spells them alike.

Kept free of library imports: every command module imports this at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer


class Head(str, Enum):
    """``--head`` of predict and eval (edgecl.device.infer.HEADS)."""
    auto = "auto"   # lda when the state has its statistics, else ncm
    ncm = "ncm"     # cosine similarity to the class prototypes
    lda = "lda"     # prototypes + the pooled covariance `edgecl adapt` accumulates


class LogLevel(str, Enum):
    """``--log-level``: what is shown on stderr besides errors."""
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"   # errors only: warnings are not shown


class MaskPolicy(str, Enum):
    """``--mask-policy`` of export (edgecl.host.export.MASK_POLICIES)."""
    no_depthwise = "no-depthwise"   # depthwise conv weights stay constant (a faster device step)
    all = "all"                     # every tensor may be selected


HEAD_HELP = ("Classifier: ncm (cosine to prototypes), lda (prototypes + the pooled covariance adapt "
             "accumulates), auto (lda when available).")


def jsonable(obj: Any) -> Any:
    """Plain JSON values: dataclasses as dicts, paths as strings, NaN and infinities as null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "to_json") and callable(obj.to_json):
        return jsonable(obj.to_json())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float) or hasattr(obj, "__float__"):
        if hasattr(obj, "dtype") and getattr(obj.dtype, "kind", "") in "iub":  # numpy integers and bools
            return obj.item()
        value = float(obj)
        return value if math.isfinite(value) else None
    return str(obj)


def echo_json(obj: Any) -> None:
    """Print ``obj`` as strict JSON (``allow_nan=False``: a bare NaN token would break every parser)."""
    typer.echo(json.dumps(jsonable(obj), indent=2, allow_nan=False))


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (strict JSON: no NaN).")]

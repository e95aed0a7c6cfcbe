"""``protoclr export``: a run's encoder in the formats its users load elsewhere, each with the lines that load it.

    protoclr export runs/NAME --format torchvision --out resnet18.pt        # state dict of torchvision's ResNet
    protoclr export runs/NAME --format safetensors --out encoder.safetensors  # tensors, the run's config in the header
    protoclr export runs/NAME --format torchscript --out encoder.torchscript  # torch.jit.load(path)(x)
    protoclr export runs/NAME --format onnx --out encoder.onnx               # onnxruntime, dynamic batch axis
    protoclr export runs/NAME --format onnx --out encoder.onnx --with-projector   # outputs (features, projection)

What is exported is the backbone in eval mode: ``x (B, C, s, s) -> h (B, F)``, the features evaluation uses, at
the run's input: ``C`` channels, ``s`` pixels, normalized per channel with the mean and std of the run's views
(printed, and in the safetensors header). ``--with-projector`` adds the projector: ``x -> (h, z)`` with ``z (B, D)``
(state-dict formats: its weights under ``projector.<i>.*``, the index of ``torch.nn.Sequential``).

Formats (``FORMATS``):

- ``torchvision`` (ResNet runs only): the keys of ``torchvision.models.resnet18/50``, minus ``fc.*`` (protoclr's
  ``fc`` is the identity: features, no classifier), so ``model.fc = torch.nn.Identity()`` and
  ``load_state_dict(strict=True)``. A run with ``model.small_images=true`` has the small-image stem, which the user
  sets too, in two lines (``conv1``: 3x3 stride 1; ``maxpool``: identity); the command prints them. timm's ResNets
  use the same keys, so the file loads into ``timm.create_model("resnet18", num_classes=0)`` the same way.
- ``safetensors``: the backbone's own keys (torchvision's for ResNets, timm's for ``timm/<name>``, protoclr's for
  ``convnet``) and a JSON header with the resolved config, input size, channels, mean and std.
- ``torchscript``: ``torch.jit.trace`` at the run's input size (any batch size runs). PyTorch marks TorchScript
  deprecated; the format is kept because many deployments still read it.
- ``onnx``: ``torch.onnx.export`` (the ``torch.export``-based exporter where this torch has it, else the
  TorchScript-based one), input ``images``, outputs ``features`` (and ``projection``), batch axis dynamic.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import io
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import protoclr
from protoclr import atomic, extras
from protoclr.config import Config
from protoclr.errors import UnknownChoice, UserError
from protoclr.models import TIMM_PREFIX, Encoder
from protoclr.runs import load_run
from protoclr.views import ViewSpec, config_view_spec

TORCHVISION_BACKBONES = ("resnet18", "resnet50")


@dataclass
class Run:
    """What an export reads from a run: the encoder (eval mode), its config and its input."""

    encoder: Encoder
    cfg: Config
    spec: ViewSpec  # the run's global views: size s, channels C, mean and std

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.channels, self.spec.size, self.spec.size  # (C, s, s)


def open_run(path: str | Path) -> Run:
    """The run folder (or checkpoint file) at ``path``; a missing or foreign one is a one-line user error."""
    encoder, cfg = load_run(path)
    return Run(encoder.eval(), cfg, config_view_spec(cfg.data))


def export_module(run: Run, *, with_projector: bool = False) -> nn.Module:
    """The module an export holds: ``x (B, C, s, s) -> h (B, F)``, or ``-> (h, z)`` with the projector."""
    return run.encoder if with_projector else run.encoder.backbone


def export_state_dict(run: Run, *, with_projector: bool = False) -> dict[str, torch.Tensor]:
    """The backbone's state dict under its own keys (torchvision's, timm's or protoclr's), plus with the projector
    its ``torch.nn.Sequential`` as ``projector.<i>.*``; tensors contiguous and unshared (safetensors needs both)."""
    out = {k: v.detach().contiguous().clone() for k, v in run.encoder.backbone.state_dict().items()}
    if with_projector:
        out |= {f"projector.{k}": v.detach().contiguous().clone()
                for k, v in run.encoder.projector.net.state_dict().items()}  # net.0.weight -> projector.0.weight
    return out


def example_input(run: Run, *, batch: int = 2) -> torch.Tensor:
    """``(batch, C, s, s)`` float32, seeded: what tracing runs the model on (the values do not matter)."""
    return torch.randn(batch, *run.input_shape, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------
# the lines a user writes to load each export (printed by the command; the tests run them)


def _module_code(m: nn.Module) -> str:
    """The constructor call of one projector layer (protoclr.models.Projector: Linear, a 1d norm, ReLU)."""
    if isinstance(m, nn.Linear):
        return f"torch.nn.Linear({m.in_features}, {m.out_features}, bias={m.bias is not None})"
    if isinstance(m, nn.BatchNorm1d):
        return f"torch.nn.BatchNorm1d({m.num_features})"
    if isinstance(m, nn.LayerNorm):
        return f"torch.nn.LayerNorm({m.normalized_shape[0]})"
    if isinstance(m, (nn.ReLU, nn.Identity)):
        return f"torch.nn.{type(m).__name__}()"
    raise TypeError(f"no constructor line for projector layer {m!r}")  # a new layer kind: teach it here


def _projector_lines(run: Run, state: str) -> list[str]:
    layers = "".join(f"    {_module_code(m)},\n" for m in run.encoder.projector.net)
    return [f"projector = torch.nn.Sequential(\n{layers}).eval()",
            f'projector.load_state_dict({{k.removeprefix("projector."): v for k, v in {state}.items() '
            'if k.startswith("projector.")})']


def _backbone_lines(run: Run) -> list[str]:
    """Lines building an empty backbone ``model`` of the run's architecture with the consumer's own library."""
    m, C = run.cfg.model, run.spec.channels
    if m.backbone in TORCHVISION_BACKBONES:
        norm = {"batch": "", "group": "norm_layer=lambda c: torch.nn.GroupNorm(math.gcd(32, c), c)",
                "none": "norm_layer=lambda c: torch.nn.Identity()"}[m.norm]
        lines = [f"model = torchvision.models.{m.backbone}({norm})"]
        if m.small_images:
            lines += [f"model.conv1 = torch.nn.Conv2d({C}, 64, kernel_size=3, stride=1, padding=1, bias=False)"
                      "  # protoclr's small-image stem",
                      "model.maxpool = torch.nn.Identity()  # (model.small_images=true)"]
        elif C != 3:
            lines += [f"model.conv1 = torch.nn.Conv2d({C}, 64, kernel_size=7, stride=2, padding=3, bias=False)"
                      f"  # {C}-channel input"]
        return [*lines, "model.fc = torch.nn.Identity()  # features, no classifier"]
    if m.backbone.startswith(TIMM_PREFIX):
        options = "".join(f", {k}={v}" for k, v in (("img_size", m.timm_img_size), ("patch_size", m.timm_patch_size))
                          if v)
        return [f'model = timm.create_model("{m.backbone[len(TIMM_PREFIX):]}", pretrained=False, num_classes=0, '
                f"in_chans={C}{options})"]
    return [f"model = build_encoder(ModelConfig(backbone={m.backbone!r}, convnet_widths={m.convnet_widths!r}, "
            f"norm={m.norm!r}), in_channels={C}).backbone"]


def _imports(run: Run) -> str:
    b = run.cfg.model.backbone
    if b in TORCHVISION_BACKBONES:
        return "import math, torch, torchvision" if run.cfg.model.norm == "group" else "import torch, torchvision"
    if b.startswith(TIMM_PREFIX):
        return "import timm, torch"
    return "import torch\nfrom protoclr.config import ModelConfig\nfrom protoclr.models import build_encoder"


def _state_dict_recipe(run: Run, *, imports: str, load: str, with_projector: bool) -> str:
    lines = [imports, f"state = {load}", *_backbone_lines(run)]
    if with_projector:
        lines += ['model.load_state_dict({k: v for k, v in state.items() if not k.startswith("projector.")})',
                  *_projector_lines(run, "state")]
    else:
        lines += ["model.load_state_dict(state)  # strict"]
    return "\n".join([*lines, "model.eval()"])


def _input_note(run: Run, with_projector: bool) -> str:
    s = run.spec
    out = "h (B, F), z (B, D)" if with_projector else "h (B, F)"
    return (f"# input x: (B, {s.channels}, {s.size}, {s.size}) float32 in [0, 1], then normalized per channel,\n"
            f"# (x - mean) / std with mean={list(s.mean)}, std={list(s.std)}; output: {out}")


# ----------------------------------------------------------------------------------------------------------
# the formats: each returns the bytes of the file and the lines that load it


def _torchvision(run: Run, path: Path, with_projector: bool) -> tuple[bytes, str]:
    b = run.cfg.model.backbone
    if b not in TORCHVISION_BACKBONES:
        raise UserError(f"--format torchvision holds torchvision ResNets (model.backbone="
                        f"{' or '.join(TORCHVISION_BACKBONES)}); this run's backbone is {b}: use --format safetensors, "
                        "torchscript or onnx")
    buf = io.BytesIO()
    torch.save(export_state_dict(run, with_projector=with_projector), buf)
    recipe = _state_dict_recipe(run, imports=_imports(run), load=f"torch.load({str(path)!r}, weights_only=True)",
                                with_projector=with_projector)
    return buf.getvalue(), recipe


def safetensors_header(run: Run, *, with_projector: bool) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors export (strings only, as the format wants; JSON where structured)."""
    s, m = run.spec, run.cfg.model
    layout = "torchvision" if m.backbone in TORCHVISION_BACKBONES else \
        "timm" if m.backbone.startswith(TIMM_PREFIX) else "protoclr"
    return {"format": "pt", "protoclr_version": protoclr.__version__, "backbone": m.backbone, "key_layout": layout,
            "in_channels": str(s.channels), "input_size": str(s.size), "mean": json.dumps(list(s.mean)),
            "std": json.dumps(list(s.std)), "outputs": "features,projection" if with_projector else "features",
            "feature_dim": str(run.encoder.feature_dim), "protoclr_config": json.dumps(run.cfg.to_dict())}


def _safetensors(run: Run, path: Path, with_projector: bool) -> tuple[bytes, str]:
    extras.require("safetensors", why="--format safetensors")
    from safetensors.torch import save

    data = save(export_state_dict(run, with_projector=with_projector),
                   metadata=safetensors_header(run, with_projector=with_projector))
    imports = _imports(run) + "\nfrom safetensors.torch import load_file"
    recipe = _state_dict_recipe(run, imports=imports, load=f"load_file({str(path)!r})", with_projector=with_projector)
    return data, recipe + f"\n# the header: safetensors.safe_open({str(path)!r}, 'pt').metadata()"


def _torchscript(run: Run, path: Path, with_projector: bool) -> tuple[bytes, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 marks torch.jit deprecated
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(export_module(run, with_projector=with_projector), example_input(run))
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    out = "h, z = model(x)" if with_projector else "h = model(x)"
    return buf.getvalue(), f"import torch\nmodel = torch.jit.load({str(path)!r}).eval()\n{out}"


def _onnx(run: Run, path: Path, with_projector: bool) -> tuple[bytes, str]:
    extras.require("onnx", why="--format onnx")
    outputs = ["features", "projection"] if with_projector else ["features"]
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": outputs}
    accepted = inspect.signature(torch.onnx.export).parameters
    if "dynamo" in accepted:  # torch >= 2.5: the torch.export-based exporter (the default from 2.9 on)
        extras.require("onnxscript", why="--format onnx")
        kwargs |= {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},), "verbose": False}
        if "external_data" in accepted:
            kwargs["external_data"] = False  # one self-contained file (under the 2 GB protobuf limit)
    else:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in ["images", *outputs]}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        file = Path(tmp) / "model.onnx"
        torch.onnx.export(export_module(run, with_projector=with_projector), (example_input(run),), str(file),
                          **kwargs)
        data = file.read_bytes()
    out = "h, z" if with_projector else "(h,)"
    return data, (f"import onnxruntime\nsession = onnxruntime.InferenceSession({str(path)!r})\n"
                  f'{out} = session.run(None, {{"images": x.numpy()}})')


# format name -> writer(run, out_path, with_projector) -> (file bytes, the lines that load it)
FORMATS: dict[str, Callable[[Run, Path, bool], tuple[bytes, str]]] = {
    "torchvision": _torchvision,
    "safetensors": _safetensors,
    "torchscript": _torchscript,
    "onnx": _onnx,
}


def check_target(fmt: str, out: Path) -> None:
    """A known format and an ``out`` that is not a folder, or a one-line user error (before any work is done)."""
    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, list(FORMATS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownChoice(f"--format: unknown format {fmt!r}; {hint}choose one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file path, e.g. {out / ('encoder.' + fmt)}")


def export(run: Run, *, fmt: str, out: str | Path, with_projector: bool = False) -> str:
    """Write ``run``'s encoder to ``out`` in format ``fmt`` (atomically); returns the lines that load it."""
    out = Path(out)
    check_target(fmt, out)
    with torch.no_grad():
        data, recipe = FORMATS[fmt](run, out, with_projector)
    try:
        atomic.write_bytes(out, data)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror or type(e).__name__}); pass a path in a "
                        "writable folder") from None
    return f"{recipe}\n{_input_note(run, with_projector)}"


# ----------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="protoclr export", description="Write a run's encoder (backbone, eval mode) for use outside protoclr, "
        "and print the lines that load it.",
        epilog="torchvision: ResNet runs, a state dict for torchvision.models.resnet18/50 (strict). safetensors: the "
        "backbone's own keys and the config in the header. torchscript and onnx: traced at the run's input size, "
        "any batch size. docs/export.md has the details.")
    p.add_argument("run", metavar="RUN_DIR", help="a run folder (or its checkpoint.pt)")
    p.add_argument("--format", required=True, metavar="FORMAT", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, metavar="PATH", help="the file to write (replaced if it exists)")
    p.add_argument("--with-projector", action="store_true", help="add the projector: outputs (features, projection)")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    check_target(args.format, Path(args.out))  # the cheap mistakes before the run is loaded
    recipe = export(open_run(args.run), fmt=args.format, out=args.out, with_projector=args.with_projector)
    print(f"wrote {args.out} ({args.format}); load it with:\n\n{recipe}")
    return 0


__all__ = ["FORMATS", "Run", "check_target", "cli_main", "example_input", "export", "export_module",
           "export_state_dict", "open_run", "safetensors_header"]

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))

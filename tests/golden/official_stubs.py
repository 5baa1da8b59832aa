"""Small fake modules for the frameworks official releases import (detectron2, fvcore), and loaders that import
an official package from an extracted directory without running its ``__init__`` (which registers datasets).

Only what the official model code touches at import or in the forward passes we run is provided; anything else
raises at the point of use. Where a golden test needs real detectron2 behaviour (the test-time resize, the
post-processing resize), :func:`detectron2_function` executes detectron2's own source for that one function.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class _Registry:
    def register(self, obj=None):
        return obj if obj is not None else (lambda o: o)


def _configurable(init):
    """detectron2's @configurable, for direct keyword construction only (no cfg objects here)."""

    def wrapped(self, *args, **kwargs):
        # official subclasses call their (also @configurable) base __init__ with positional arguments (OVSeg's
        # OpenVocabTransformerPredictor); no cfg object is ever passed here
        return init(self, *args, **kwargs)

    return wrapped


class _ImageList:
    """detectron2.structures.ImageList.from_tensors: stack, zero-pad to a multiple of ``size_divisibility``."""

    def __init__(self, tensor: torch.Tensor, image_sizes: list[tuple[int, int]]) -> None:
        self.tensor, self.image_sizes = tensor, image_sizes

    @classmethod
    def from_tensors(cls, tensors, size_divisibility: int = 0, pad_value: float = 0.0):
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        h, w = (max(s[i] for s in sizes) for i in (0, 1))
        if size_divisibility > 1:
            h, w = (-(-h // size_divisibility) * size_divisibility, -(-w // size_divisibility) * size_divisibility)
        batch = tensors[0].new_full((len(tensors), tensors[0].shape[0], h, w), pad_value)
        for out, t in zip(batch, tensors):
            out[:, : t.shape[-2], : t.shape[-1]].copy_(t)
        return cls(batch, sizes)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install_detectron2_stubs() -> None:
    """detectron2 / fvcore names imported by the CAT-Seg and OVSeg model files."""
    if "detectron2" in sys.modules:
        return
    _module("detectron2", __path__=[])
    _module("detectron2.config", configurable=_configurable, CfgNode=dict)
    _module("detectron2.data", MetadataCatalog=None, DatasetCatalog=None)
    _module(
        "detectron2.modeling",
        META_ARCH_REGISTRY=_Registry(),
        SEM_SEG_HEADS_REGISTRY=_Registry(),
        BACKBONE_REGISTRY=_Registry(),
        build_backbone=None,
        build_sem_seg_head=None,
        Backbone=torch.nn.Module,
        ShapeSpec=None,
        __path__=[],
    )
    _module("detectron2.modeling.backbone", Backbone=torch.nn.Module)
    _module("detectron2.modeling.postprocessing", sem_seg_postprocess=None)
    _module("detectron2.structures", ImageList=_ImageList)
    _module("detectron2.utils", __path__=[])
    _module("detectron2.utils.memory", _ignore_torch_cuda_oom=None)
    _module("detectron2.layers", Conv2d=torch.nn.Conv2d, ShapeSpec=None, get_norm=None)
    _module("fvcore", __path__=[])
    _module("fvcore.nn", weight_init=types.SimpleNamespace(c2_xavier_fill=lambda m: None), __path__=[])
    _module("fvcore.nn.weight_init", c2_xavier_fill=lambda m: None)


def import_official(root: Path, module: str, packages: tuple[str, ...]) -> types.ModuleType:
    """Import ``module`` from an extracted official tree at ``root``; the listed packages are registered as bare
    namespaces so their ``__init__`` files (dataset registration, heavy imports) do not run."""
    for package in packages:
        if package not in sys.modules:
            _module(package, __path__=[str(root / package.replace(".", "/"))])
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)


def detectron2_function(detectron2_root: Path, relative_file: str, qualname: str) -> Callable:
    """A function (or ``Class.method``) of detectron2's source file, executed on its own.

    The body runs as detectron2 wrote it; its module-level names are provided (numpy, torch, F, PIL.Image, sys).
    Methods come back unbound: pass an object with the attributes they read as ``self``.
    """
    import numpy as np
    from PIL import Image

    tree = ast.parse((detectron2_root / relative_file).read_text())
    names = qualname.split(".")
    body = tree.body
    node = None
    for name in names:
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
        body = node.body
    node.decorator_list = []
    import os

    namespace: dict[str, Any] = {
        "np": np,
        "torch": torch,
        "F": F,
        "Image": Image,
        "sys": sys,
        "os": os,
        "Tuple": tuple,
        "List": list,
    }
    exec(compile(ast.Module(body=[node], type_ignores=[]), relative_file, "exec"), namespace)
    return namespace[node.name]


def source_module(root: Path, relative_file: str, name: str) -> types.ModuleType:
    """One file of an extracted official tree executed as a module of its own (``utils/optimizer.py``), without
    its package's ``__init__``."""
    spec = importlib.util.spec_from_file_location(name, root / relative_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

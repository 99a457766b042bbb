"""Which torch APIs the runtime code uses, and whether the oldest supported torch has them.

``used_names`` reads the project's runtime sources (not bench/ or tests/) and lists every
``torch.*`` name they use, with the keyword arguments of calls to it (``torch.load:weights_only``).
Run under the oldest torch that requirements.txt allows, this module writes the list of
those names that exist there (``tests/data/torch_floor_api.txt``):

    python tests/torch_api.py --write        # with torch 2.3.x installed

``tests/test_torch_floor.py`` then checks, with any torch, that the code uses nothing
outside that list (or outside ``GUARDED``: names only reached behind a version check).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = Path(__file__).resolve().parent / "data" / "torch_floor_api.txt"
RUNTIME = ("models", "training", "main.py", "main-8p.py", "demo.py", "pthtar2onnx.py")
# Keywords the code passes through a ``**dict`` (the scan cannot see them).
SPLATTED = ("torch.optim.SGD:fused", "torch.optim.SGD:foreach", "torch.optim.SGD:nesterov",
            "torch.optim.SGD:momentum", "torch.optim.SGD:lr", "torch.distributed.init_process_group:backend",
            "torch.distributed.init_process_group:rank", "torch.distributed.init_process_group:world_size",
            "torch.distributed.init_process_group:timeout", "torch.distributed.init_process_group:store",
            "torch.distributed.init_process_group:init_method", "torch.distributed.init_process_group:device_id",
            "torch.utils.data.DataLoader:pin_memory", "torch.utils.data.DataLoader:pin_memory_device",
            "torch.utils.data.DataLoader:persistent_workers", "torch.utils.data.DataLoader:worker_init_fn",
            "torch.utils.data.DataLoader:prefetch_factor",
            "torch.nn.parallel.DistributedDataParallel:broadcast_buffers",
            "torch.nn.parallel.DistributedDataParallel:forward_sync_buffers", "torch.onnx.export:dynamo")


def runtime_sources() -> list[Path]:
    paths: list[Path] = []
    for name in RUNTIME:
        path = REPO / name
        paths.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return paths


def _aliases(tree: ast.Module) -> dict[str, str]:
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return ".".join([aliases[node.id], *reversed(parts)])
    return None


def used_names(paths: list[Path] | None = None) -> set[str]:
    """``torch.a.b`` for every name used, ``torch.a.b:keyword`` for every keyword passed to it."""
    found: set[str] = set()
    for path in paths or runtime_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _aliases(tree)
        inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in inner:
                if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                    continue
                name = _dotted(node, aliases)
                if name and name != "torch":
                    found.add(name)
            if isinstance(node, ast.Call):
                name = _dotted(node.func, aliases)
                if name:
                    found.update(f"{name}:{keyword.arg}" for keyword in node.keywords if keyword.arg)
    return found | set(SPLATTED)


def _resolve(dotted: str):
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(dotted)


def exists(entry: str) -> bool:
    """Whether this torch has the name (and accepts the keyword)."""
    name, _, keyword = entry.partition(":")
    try:
        obj = _resolve(name)
    except (ImportError, AttributeError):
        return False
    if not keyword:
        return True
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return True  # a C function without a signature: its keywords cannot be checked here
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {MANIFEST.name} for the installed torch")
    args = parser.parse_args(argv)
    import torch

    names = sorted(used_names())
    present = [name for name in names if exists(name)]
    missing = [name for name in names if name not in present]
    for name in missing:
        print(f"not in torch {torch.__version__}: {name}")
    if args.write:
        MANIFEST.write_text(f"# torch {torch.__version__}: the torch names the runtime code uses that exist there\n"
                            + "".join(f"{name}\n" for name in present), encoding="utf-8")
        print(f"wrote {MANIFEST} ({len(present)} names, {len(missing)} missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""From parsed options to the values a run really uses: the one resolution policy.

Each training option takes, in this order:

1. the value the user typed on this command line;
2. when resuming, the value saved in the checkpoint (the run continues as it was set up);
3. the recipe of the architecture at this world size (``training.recipes``).

A recipe warm-up longer than a shortened run is scaled with it; an explicit warm-up that
reaches the last epoch is an error (a note only for a throughput run cut by
``--max-steps``). Under ``--multiprocessing-distributed``, ``-b`` and ``-j`` are per node
and divided between its devices, as ModelZoo's ``main.py`` does.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from models.errors import UserError
from training.options import build_parser, resumed_options
from training.recipes import Recipe, recipe_for

# The options that define the training: a resumed run takes them from the checkpoint unless typed.
# Every option of the parser says whether it is one (``resumed=`` in training.options).
RESUMED_OPTIONS = resumed_options(build_parser())


class OptionError(UserError):
    """A combination of option values that cannot make a sensible run."""


@dataclass
class Resolution:
    """The resolved options and the lines that explain choices made for the user."""

    args: argparse.Namespace
    notes: list[str] = field(default_factory=list)


def _take_from_checkpoint(args: argparse.Namespace, explicit: frozenset[str], saved: dict[str, Any]) -> set[str]:
    # A recipe typed on the resume command line brings its own values for the recipe's fields.
    new_recipe = "recipe" in explicit and saved.get("recipe", "modelzoo") != args.recipe
    skipped = {item.name for item in fields(Recipe)} if new_recipe else set()
    taken = set()
    for name in RESUMED_OPTIONS:
        if name not in explicit and name not in skipped and name in saved:
            setattr(args, name, saved[name])
            taken.add(name)
    return taken


def _fill_from_recipe(args: argparse.Namespace, recipe: Recipe) -> None:
    for item in fields(Recipe):
        if getattr(args, item.name, None) is None:
            setattr(args, item.name, getattr(recipe, item.name))


def _fit_warm_up(args: argparse.Namespace, recipe: Recipe, from_recipe: bool) -> str | None:
    """Scale a recipe warm-up down with a shortened run; refuse an explicit one that never ends."""
    if from_recipe:
        if args.warm_up_epochs and args.epochs < recipe.epochs:
            scaled = args.warm_up_epochs * args.epochs / recipe.epochs
            note = (f"warm-up scaled with the run: the recipe's {args.warm_up_epochs:g} of {recipe.epochs} epochs "
                    f"-> {scaled:.3g} of {args.epochs} (give --warm_up_epochs to choose)")
            args.warm_up_epochs = scaled
            return note
        return None
    if args.evaluate or not (args.warm_up_epochs and args.warm_up_epochs >= args.epochs):
        return None
    problem = (f"--warm_up_epochs {args.warm_up_epochs:g} reaches the last epoch (--epochs {args.epochs}): "
               f"the learning rate never leaves the warm-up ramp")
    if args.max_steps:
        # A throughput run (cut by --max-steps, as the ModelZoo performance lines are) does not
        # care where the learning rate is; say so and go on.
        return problem + "; accepted for a run cut by --max-steps"
    raise OptionError(problem + "; use fewer warm-up epochs")


def _changes(saved: dict[str, Any], args: argparse.Namespace) -> str | None:
    changed = [f"{name} {saved[name]} -> {getattr(args, name)}" for name in RESUMED_OPTIONS
               if name in saved and saved[name] != getattr(args, name)]
    return "options changed from the checkpoint: " + ", ".join(changed) if changed else None


def resolve_options(args: argparse.Namespace, explicit: frozenset[str], process_count: int,
                    saved_args: dict[str, Any] | None = None) -> Resolution:
    """The options a run uses (a copy of ``args``), with notes for the log.

    Args:
        explicit: option destinations the user typed (``training.options.CommandLine``).
        process_count: processes in the job (picks the 1-device or the multi-device recipe).
        saved_args: the resumed checkpoint's options, if any.
    """
    args = argparse.Namespace(**vars(args))
    saved = dict(saved_args or {})
    taken = _take_from_checkpoint(args, explicit, saved)
    recipe = recipe_for(args.arch, process_count, dummy=args.dummy, name=args.recipe)
    warm_up_from_recipe = "warm_up_epochs" not in explicit and "warm_up_epochs" not in taken
    _fill_from_recipe(args, recipe)
    if args.start_epoch is None:
        args.start_epoch = 0
    notes = [note for note in (_fit_warm_up(args, recipe, warm_up_from_recipe), _changes(saved, args)) if note]
    return Resolution(args, notes)


def divide_per_node(args: argparse.Namespace, devices_per_node: int) -> str | None:
    """``--multiprocessing-distributed``: ``-b``/``-j`` given per node become per device.

    ModelZoo's main.py divides both by the node's devices (the workers rounding up), as
    pytorch/examples does; unset values stay the recipe's per-device batch.
    """
    note = None
    if args.batch_size is not None:
        per_device = args.batch_size // devices_per_node
        if per_device < 1:
            raise OptionError(f"-b {args.batch_size} is the batch of the whole node under "
                              f"--multiprocessing-distributed: too small for its {devices_per_node} devices")
        note = (f"-b {args.batch_size} per node / {devices_per_node} devices = {per_device} per device "
                f"(--multiprocessing-distributed, as ModelZoo)")
        if per_device * devices_per_node != args.batch_size:
            note += f"; {args.batch_size - per_device * devices_per_node} images of the node batch left out"
        args.batch_size = per_device
    if args.workers is not None:
        args.workers = -(-args.workers // devices_per_node)
    return note

"""The Pixi binary as a pinned, verified artifact."""

from .pins import PixiPin, find_pin, load_pins, this_target

__all__ = ["PixiPin", "find_pin", "load_pins", "this_target"]

"""The Pixi binary as a pinned, verified artifact."""

from pixicache.backends.pixi.pins import PixiPin, find_pin, load_pins, this_target

__all__ = ["PixiPin", "find_pin", "load_pins", "this_target"]

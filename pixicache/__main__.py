"""``python -m pixicache`` (and the single-file bundle) runs the CLI."""

from pixicache.cli import entry

if __name__ == "__main__":
    entry()

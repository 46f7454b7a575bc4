"""``python -m pixicache`` (and the single-file bundle) runs the CLI."""

from pixicache.cli import main

if __name__ == "__main__":
    main()

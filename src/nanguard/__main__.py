"""__main__.py makes ``python -m nanguard`` run the ``nanguard`` command; the command itself is in cli.py."""

from __future__ import annotations

from nanguard.cli import main

if __name__ == "__main__":
    main()

"""__main__.py makes ``python -m nanguard`` run the ``nanguard`` command (the nanguard.cli package)."""

from __future__ import annotations

from nanguard.cli import main

if __name__ == "__main__":
    main()

"""nanguard.integrations holds the adapters that attach the guard to third-party training loops.

Each submodule imports its framework lazily; the core never imports this package.
"""

"""The only modules that touch upstream internals, one per upstream; ``tests/test_compat.py`` fails loudly when
those internals move (each module says what it uses and why)."""

"""The only modules that touch upstream internals, one per upstream (``pyat``, ``softioc``, ``queueserver``, ...);
``tests/test_compat*.py`` fail loudly when those internals move (each module says what it uses and why)."""

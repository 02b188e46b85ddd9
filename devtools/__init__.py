"""Dev tooling: what starts servers for `make dev`, the tests and the benchmarks.

Not product: the wheel installs only ``app`` and ``workers`` (pyproject's
``[tool.setuptools.packages.find]``), so nothing there may import this package.

- ``server``: the one base class of every server we run as a child process
- ``postgres``, ``redis_server``: private PostgreSQL and Redis (or Valkey) servers
- ``simprocess``: the model simulator (``python -m app.sim``) as a child process
- ``binaries``, ``accounts``, ``processes``: finding server binaries, running PostgreSQL
  as a non-root account, reading /proc
- ``dev``: ``make dev``
"""

"""The end-to-end benchmark (issue 5): ``pylogstreams bench`` or ``python bench/e2e.py``.

Producers and consumers in spawned processes drive a fresh broker (Cython
and pure mode; through the client library and through raw pre-encoded
frames) and, in the same run, Redis Streams and NATS JetStream through
their Python clients. See docs/benchmarks.md for what each figure means
and the latest tables; ``pylogstreams bench --help`` for the options.

Modules: :mod:`.harness` (scenarios, runs, command line), :mod:`.workers`
(load-generating processes, our drivers), :mod:`.peers` (Redis and NATS
drivers), :mod:`.servers` (starting and stopping servers, /proc figures),
:mod:`.report` (tables, JSON, plot).
"""

from .harness import SCENARIOS, main

__all__ = ["main", "SCENARIOS"]

"""The `cltrace` command: a thin dispatcher over the stages' own CLI modules."""


def entry() -> int:
    """The `cltrace` command: restarted once with huge pages for large allocations (and, for
    `cltrace train`, a heap that keeps its pages; see `cltrace.hostmem`; before any heavy
    import), then `cltrace.cli.main`."""
    import os
    import sys
    import time

    # When the command started, kept across the re-exec (clt.progress.process_seconds).
    os.environ.setdefault("CLTRACE_T0", repr(time.time()))
    from cltrace.hostmem import reexec_with_huge_pages

    # Training reuses the same large buffers every step: it keeps its heap's pages too.
    reexec_with_huge_pages("cltrace", sys.argv[1:], keep_heap=sys.argv[1:2] == ["train"])
    from cltrace.cli import main

    return main()

"""The `cltrace` command: a thin dispatcher over the stages' own CLI modules."""

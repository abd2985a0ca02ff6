"""Several processes, one job (`--distributed`): the flags every multi-process command takes,
checked before anything starts, `jax.distributed.initialize` with them, and small host-side
collectives (gathering JSON-able results on every process)."""

from __future__ import annotations

import json

import numpy as np

from clt.configs import ConfigError


def add_arguments(p, what: str) -> None:
    """--distributed, --coordinator, --num-processes, --process-id on parser `p`."""
    p.add_argument("--distributed", action="store_true",
                   help=f"Call jax.distributed.initialize() first and {what} (run the same "
                   "command in every process; coordinator from the cluster environment or the "
                   "flags below).")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host).")
    p.add_argument("--num-processes", type=int, default=None, help="Processes in the job.")
    p.add_argument("--process-id", type=int, default=None, help="This process's index.")


def check_arguments(args) -> None:
    """The jax.distributed flags, before anything starts."""
    n, i = args.num_processes, args.process_id
    if n is not None and n < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {n}")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise ConfigError(f"--process-id must be in [0, num_processes), got {i}")
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--coordinator must be host:port, got {args.coordinator!r}")
    if not args.distributed and (n, i, args.coordinator) != (None, None, None):
        raise ConfigError("--coordinator, --num-processes and --process-id need --distributed")


def initialize(args) -> None:
    """jax.distributed.initialize with the flags given (the rest from the environment). CPU
    processes exchange through gloo (XLA's CPU client has no collectives otherwise; the setting
    does nothing on accelerators)."""
    import jax

    if not args.distributed:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {k: v for k, v in (("coordinator_address", args.coordinator),
                            ("num_processes", args.num_processes),
                            ("process_id", args.process_id)) if v is not None}
    jax.distributed.initialize(**kw)


def gather_json(value) -> list:
    """[value of process 0, value of process 1, ...] on every process (a single process: [value]).
    Values are JSON-able; it is also a barrier."""
    import jax

    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils as mh

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(mh.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    every = np.asarray(mh.process_allgather(buf))
    return [json.loads(bytes(every[i, :int(sizes[i])]).decode()) for i in range(len(sizes))]


__all__ = ["add_arguments", "check_arguments", "gather_json", "initialize"]

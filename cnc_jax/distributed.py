"""Process setup for multi-host runs (train.py, sample.py, the prepare steps), in one place.

A pod runs one program per host; `jax.distributed.initialize` joins them into one JAX runtime (global devices,
cross-host collectives). Empty / -1 settings are auto-detected (Cloud TPU, SLURM, Open MPI), as JAX does. On CPU
the cross-process collectives need an implementation: gloo (what the multi-process tests use: N processes with
forced host devices on one machine).

Also the few host-level agreements the scripts need: "did any process see SIGTERM?", "how many bad jobs in
all?", strings gathered on process 0 (the data iterator state of every process for the checkpoint). They go
through the coordination service's key-value store, not device collectives: with gloo (CPU) a process gets only
30 s to join a collective that a peer started, and processes reach these points minutes apart (one compiles
what another loaded from the compilation cache, one samples more images).
"""

from __future__ import annotations

import argparse
import itertools
from typing import Optional

import jax

TIMEOUT_MS = 60 * 60 * 1000  # how long a process waits for the others at an agreement point
_rounds = itertools.count()  # every process passes the same agreement points in the same order


def initialize(distributed: bool, coordinator_address: str = "", num_processes: int = -1,
               process_id: int = -1) -> str:
    """Join the other processes (when `distributed`) and return the start line (also printed)."""
    if distributed:
        kwargs = {"coordinator_address": coordinator_address or None,
                  "num_processes": num_processes if num_processes > 0 else None,
                  "process_id": process_id if process_id >= 0 else None}
        # only the CPU backend reads it; harmless where the devices are TPUs or GPUs
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(**kwargs)
        except (RuntimeError, ValueError) as e:  # unreachable coordinator, inconsistent ids, nothing to detect
            raise ValueError(f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                             f"failed: {e}") from None
    line = (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
            f"{jax.device_count()} global {jax.devices()[0].platform} devices")
    print(line, flush=True)
    return line


def from_config(config) -> str:
    """initialize() from a train config (config.distributed, coordinator_address, num_processes, process_id)."""
    return initialize(config.distributed, config.coordinator_address, config.num_processes, config.process_id)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--distributed --coordinator-address A --num-processes N --process-id I for the argparse scripts."""
    group = parser.add_argument_group("multi-host (jax.distributed; unset values are auto-detected)")
    group.add_argument("--distributed", action="store_true", help="join the other processes of the run")
    group.add_argument("--coordinator-address", default="", help="host:port of process 0")
    group.add_argument("--num-processes", type=int, default=-1)
    group.add_argument("--process-id", type=int, default=-1)


def from_args(args: argparse.Namespace) -> str:
    """initialize() from add_arguments' flags; -1 is "auto-detect", any other count or index below it a mistake
    (ValueError naming the flag) rather than silently auto-detected."""
    if args.num_processes != -1 and args.num_processes < 1:
        raise ValueError(f"--num-processes: -1 (auto-detect) or a count >= 1, got {args.num_processes}")
    if args.process_id != -1 and not 0 <= args.process_id < (args.num_processes if args.num_processes > 0 else 2**31):
        raise ValueError(f"--process-id: -1 (auto-detect) or an index in [0, --num-processes), got {args.process_id}")
    return initialize(args.distributed, args.coordinator_address, args.num_processes, args.process_id)


def process_shard() -> tuple[int, int]:
    """(this process's index, the process count): its share of per-item work."""
    return jax.process_index(), jax.process_count()


def is_main() -> bool:
    """The process that writes a run's shared files."""
    return jax.process_index() == 0


def _client():
    # The coordination service's key-value store has no public API. It is used rather than collectives because
    # its waits have our timeout, while a gloo collective gives up after 30 s (a peer may be compiling for minutes).
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def exchange(text: str) -> list[str]:
    """Every process's string, in process order, on every process (all processes call it at the same point)."""
    if jax.process_count() == 1:
        return [text]
    client, n, me = _client(), next(_rounds), jax.process_index()
    client.key_value_set(f"cnc_jax/{n}/{me}", text)
    values = [client.blocking_key_value_get(f"cnc_jax/{n}/{i}", TIMEOUT_MS) for i in range(jax.process_count())]
    if n >= 2:  # everyone has written round n-1, so everyone has read round n-2
        client.key_value_delete(f"cnc_jax/{n - 2}/{me}")
    return values


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on one (all processes must call it at the same point)."""
    return any(v == "1" for v in exchange("1" if flag else "0"))


def total(value: int) -> int:
    """The sum of an integer over all processes (all processes must call it at the same point)."""
    return sum(int(v) for v in exchange(str(int(value))))


def gather_strings(text: str) -> list[str]:
    """Every process's string, in process order, on every process."""
    return exchange(text)


def barrier(name: str) -> None:
    """Wait until every process got here (a no-op with one process)."""
    if jax.process_count() > 1:
        _client().wait_at_barrier(f"cnc_jax/{name}/{next(_rounds)}", TIMEOUT_MS)


def share(jobs: list, index: Optional[int] = None, count: Optional[int] = None) -> list:
    """This process's part of a list every process holds in the same order: items index, index + count, ..."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return jobs[index::count]

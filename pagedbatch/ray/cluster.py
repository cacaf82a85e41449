"""The Ray side of a job: joining (or starting) a cluster, and the pool of replica actors.

A replica of one rank is an actor with one GPU (or one CPU). A replica of
`tensor_parallel` N ranks is a placement group of one bundle, N GPUs (or N CPUs on a
cluster without GPUs), packed on one node (STRICT_PACK), and an actor that takes the whole
bundle: Ray gives it the bundle's GPUs in CUDA_VISIBLE_DEVICES, and its `LLM` starts the
N-1 tensor-parallel workers as child processes, which inherit them (rank r on the r-th).

Only this module and `ray_llm.py` import Ray, and only when a job asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.threads import process_cpus
from pagedbatch.ray.replica import Replica
from pagedbatch.ray.watchdog import start_watchdog

RAY_MISSING = 'Ray is not installed; --ray needs it: pip install -e ".[ray]"'
NAMESPACE = "pagedbatch"
ACTOR_PREFIX = "pagedbatch-replica"  # names of the replica actors (tests find them so)
# Logical CPUs a local cluster declares beyond one per replica: Ray's own tasks need some,
# or actors and tasks wait on each other forever ("Cluster resources are not enough").
SPARE_CPUS = 4
PRIVATE = "pagedbatch_job_cluster"  # the resource that marks a job's own local cluster


class ClusterError(ValueError):
    """A cluster that cannot run the job as asked; `str()` is one line saying why."""


def import_ray() -> Any:
    """The `ray` module, or ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    return ray


@dataclass(frozen=True)
class Cluster:
    """The cluster a job runs on: whether this process started it, its resources, and the
    address of its head (GCS); for one started here, the watchdog that stops what is left of
    it when this process ends (ray/watchdog.py)."""

    started_here: bool
    gpus: int
    cpus: int
    nodes: int
    address: str = ""
    node_gpus: tuple[int, ...] = ()  # each live node's GPUs
    node_cpus: tuple[int, ...] = ()  # each live node's (logical) CPUs
    watchdog: Any = field(default=None, compare=False, repr=False)  # subprocess.Popen

    def stop_watchdog(self) -> None:
        """Let the watchdog stop what is left of a cluster started here (after
        `ray.shutdown()`: the agents that would wait for the GCS a minute or two)."""
        if self.watchdog is not None and self.watchdog.stdin is not None:
            self.watchdog.stdin.close()


def connect(address: str = "auto", *, replicas: int | None = None, ranks: int = 1) -> Cluster:
    """Join the cluster at `address` ("auto": the one running on this machine, if any), or
    start a local one when `address` is "auto" and none runs, with a CPU for each of the
    `replicas` x `ranks` processes (at least). Reuses a connection this process already has.

    A local cluster started here carries the resource PRIVATE: "auto" finds any running
    cluster, but one that another job started is left alone (that job stops it when it
    ends), and this job starts its own.
    """
    ray = import_ray()
    started, watchdog = False, None
    if not ray.is_initialized():
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
        joined = False
        try:
            ray.init(address=address, namespace=NAMESPACE, **quiet)
            joined = address != "auto" or not ray.cluster_resources().get(PRIVATE)
            if not joined:
                ray.shutdown()
        except ConnectionError as e:
            if address != "auto":
                raise ClusterError(f"cannot join the Ray cluster at {address}: {e}") from None
        if not joined:
            cpus = max(process_cpus(), (replicas or 1) * ranks) + SPARE_CPUS
            ray.init(
                address="local", num_cpus=cpus, resources={PRIVATE: 1}, namespace=NAMESPACE,
                include_dashboard=False, **quiet,
            )  # fmt: skip
            started, watchdog = True, start_watchdog()
    resources = ray.cluster_resources()
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    gcs = ray.get_runtime_context().gcs_address
    return Cluster(
        started, int(resources.get("GPU", 0)), int(resources.get("CPU", 0)), len(nodes), gcs,
        node_gpus=tuple(int(n.get("GPU", 0)) for n in nodes),
        node_cpus=tuple(int(n.get("CPU", 0)) for n in nodes), watchdog=watchdog,
    )  # fmt: skip


def reachable(address: str, timeout: float = 1.0) -> bool:
    """Whether the cluster's head (GCS) at `address` ("host:port") accepts a connection:
    when it does not, the cluster is gone (and Ray ends this process within a minute)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def lost(cluster: Cluster) -> ClusterError:
    return ClusterError(
        f"lost the Ray cluster at {cluster.address} (it was stopped, or its head node died)"
    )


class ReplicaPool:
    """`size` replica actors of one model (each of `config.tensor_parallel` ranks): started,
    replaced when one dies, stopped."""

    def __init__(self, config: EngineConfig, cluster: Cluster, size: int | None = None) -> None:
        self.cluster = cluster
        self.ranks = config.tensor_parallel
        self.use_gpus = cluster.gpus > 0 and config.device != "cpu"
        if config.device.startswith("cuda") and not cluster.gpus:
            raise ClusterError(f"device {config.device} was asked for, but the cluster has no GPU")
        self.size = size or (self._fitting() if self.use_gpus else cluster.nodes) or 1
        self._check_fits()
        self.config = self._replica_config(config)
        self._names = (f"{ACTOR_PREFIX}-{os.getpid()}-{i}" for i in itertools.count())
        self._groups: dict[Any, Any] = {}  # actor -> its placement group (ranks > 1)
        self.actors: list[Any] = [self._start() for _ in range(self.size)]
        self.load_seconds: list[float] = []
        self.dtypes: list[str] = []  # what the replicas run in (auto: per machine)

    def wait_ready(self) -> None:
        """Wait until every replica loaded its model; ClusterError naming a load failure,
        a replica that died or a cluster lost."""
        ray = import_ray()
        try:
            states = ray.get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayActorError as e:
            if not reachable(self.cluster.address):
                raise lost(self.cluster) from None
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClusterError(f"a replica died while loading the model ({reason})") from None
        for state in states:
            if state["problem"]:
                raise ClusterError(f"a replica could not load the model: {state['problem']}")
        self.load_seconds = [state["load_seconds"] for state in states]
        self.dtypes = sorted({state["dtype"] for state in states})

    def replace(self, dead: Any) -> Any:
        """A new replica in place of `dead` (it loads the model before its first shard)."""
        self.kill(dead)
        actor = self._start()
        self.actors[self.actors.index(dead)] = actor
        return actor

    def kill(self, actor: Any) -> None:
        """Stop `actor` (its tensor-parallel workers die with it) and free its GPUs."""
        ray = import_ray()
        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor)
        group = self._groups.pop(actor, None)
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(group)

    def close(self) -> None:
        for actor in self.actors:
            self.kill(actor)
        self.actors = []

    def _start(self) -> Any:
        ray = import_ray()
        options: dict[str, Any] = {
            "name": next(self._names), "namespace": NAMESPACE, "max_concurrency": 2,
            "scheduling_strategy": "SPREAD", "max_restarts": 0,
        }  # fmt: skip
        bundle = {"GPU": self.ranks, "CPU": 1} if self.use_gpus else {"CPU": self.ranks}
        options.update(num_gpus=bundle.get("GPU", 0), num_cpus=bundle["CPU"])
        group = None
        if self.ranks > 1:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = placement_group([bundle], strategy="STRICT_PACK")
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0
            )
        actor = ray.remote(Replica).options(**options).remote(self.config)
        if group is not None:
            self._groups[actor] = group
        return actor

    def _units(self) -> tuple[tuple[int, ...], str]:
        """What a rank takes on each node (GPUs, or CPUs on a cluster without), and its name."""
        if self.use_gpus:
            return self.cluster.node_gpus or (self.cluster.gpus,), "GPUs"
        return self.cluster.node_cpus or (self.cluster.cpus,), "CPUs"

    def _fitting(self) -> int:
        """How many replicas of `ranks` fit the cluster, each on one node."""
        units, _ = self._units()
        return sum(n // self.ranks for n in units)

    def _check_fits(self) -> None:
        if self.size < 1:
            raise ClusterError(f"--replicas must be >= 1, got {self.size}")
        units, what = self._units()
        if self.ranks == 1 and self.size > sum(units):
            raise ClusterError(
                f"{self.size} replicas need {self.size} {what}; the cluster has {sum(units)}"
            )
        if self.ranks > max(units):
            raise ClusterError(
                f"tensor_parallel {self.ranks} needs {self.ranks} {what} on one node; the "
                f"cluster's largest node has {max(units)}"
            )
        if self.size > self._fitting():
            raise ClusterError(
                f"{self.size} replicas of {self.ranks} {what} on one node each do not fit: "
                f"the cluster's nodes ({what} {', '.join(map(str, units))}) hold "
                f"{self._fitting()}"
            )

    def _replica_config(self, config: EngineConfig) -> EngineConfig:
        """On a CPU cluster this process started, the CPUs are shared among the replicas'
        processes (each rank's torch threads)."""
        if self.use_gpus or config.threads is not None or not self.cluster.started_here:
            return config
        if "OMP_NUM_THREADS" in os.environ:
            return config
        threads = max(1, process_cpus() // (self.size * self.ranks))
        return dataclasses.replace(config, threads=threads)

"""`pagedbatch run --ray`: the flags, the replicas' start, and what the summary adds."""

from __future__ import annotations

from typing import Any, NamedTuple

from pagedbatch.cli.common import console, fail, quiet_libraries
from pagedbatch.job.settings import RunSettings


class RayOptions(NamedTuple):
    """Where and how wide a `--ray` job runs."""

    address: str = "auto"
    replicas: int | None = None


def ray_options(ray: bool | None, address: str | None, replicas: int | None) -> RayOptions | None:
    """The --ray flags checked, before the input is read (Ray imported only with --ray)."""
    if not ray:
        if address is not None or replicas is not None:
            fail("--ray-address and --replicas go with --ray")
        return None
    if replicas is not None and replicas < 1:
        fail(f"--replicas must be >= 1, got {replicas}")
    from pagedbatch.ray.cluster import ClusterError, import_ray

    try:
        import_ray()
    except ClusterError as e:
        fail(str(e))
    return RayOptions(address or "auto", replicas)


def load_ray_llm(settings: RunSettings, options: RayOptions) -> Any:
    """A RayLLM: the cluster joined (or started), every replica's model loaded."""
    from pagedbatch.models.names import ModelLoadError
    from pagedbatch.ray.ray_llm import RayLLM

    quiet_libraries()
    try:
        return RayLLM(settings.engine, address=options.address, replicas=options.replicas)
    except (ModelLoadError, ValueError) as e:
        fail(str(e))


def ray_note(llm: Any) -> None:
    """One line after the summary: the replicas (and their tensor-parallel ranks), their
    load time, and any that died."""
    loads = ", ".join(f"{s:.1f}" for s in llm.load_seconds)
    ranks = llm.config.tensor_parallel
    each = f" of {ranks} tensor-parallel ranks" if ranks > 1 else ""
    text = f"On Ray: {llm.replicas} replicas{each} (model loads {loads} s)"
    if llm.replaced:
        text += (
            f"; {llm.replaced} replica{'s' if llm.replaced > 1 else ''} died and "
            f"{'were' if llm.replaced > 1 else 'was'} replaced, their unfinished records "
            "run again elsewhere"
        )
    console.print(text + ".", soft_wrap=True, markup=False, highlight=False)

"""The memory report for people: a Rich table; a PNG of the timeline with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

_MiB = 2**20


def memory_table(report: dict[str, Any]) -> Table:
    """The headline figures of a memory report (see `LLM.memory_report`)."""
    table = Table(title="KV cache memory", show_header=False, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    r = report
    rows = [
        ("model weights", f"{_mib(r['model_bytes'])} ({r['dtype']}), {r.get('weights', 'full precision')}"),
        ("KV pool", f"{r['num_blocks']} blocks of {r['block_size']} tokens, "
                    f"{_mib(r['kv_pool_bytes'])}"),
        ("KV bytes per token", f"{r['kv_bytes_per_token']:,} ({r.get('kv_dtype', '')})"),
        ("peak KV in use (paged)", f"{r['peak_blocks']} blocks, {_mib(r['paged_peak_bytes'])}"
                                   f" for {r['peak_running_seqs']} sequences"),
        ("same peak, contiguous cache", _mib(r["naive_contiguous_bytes"])),
        ("same peak, padded static batch", _mib(r["padded_batch_bytes"])),
        ("KV waste at peak / mean", f"{r['kv_waste_peak']:.1%} / {r['kv_waste_mean']:.1%}"),
        ("sharing saving at peak", f"{r['sharing_saving']:.1%}"),
        ("prefix hit rate", f"{r['prefix_hit_rate']:.1%}"),
        ("preemptions / recomputed tokens", f"{r['preemptions']} / {r['recomputed_tokens']}"),
        ("evicted cached blocks", str(r["evictions"])),
    ]  # fmt: skip
    if "tensor_parallel" in r:  # what one rank holds
        tp = r["tensor_parallel"]
        rows.append((f"per rank ({tp['ranks']} tensor-parallel)",
                     f"weights {_mib(tp['rank_weight_bytes'])}, KV pool "
                     f"{_mib(tp['rank_kv_pool_bytes'])}"))  # fmt: skip
    if "compiled_grammar_bytes" in r:  # structured output: host memory
        rows.append(("compiled grammars (host)", _mib(r["compiled_grammar_bytes"])))
    for name, value in rows:
        table.add_row(name, value)
    return table


def write_timeline_png(report: dict[str, Any], path: Path) -> bool:
    """Draw the blocks the job held per step (private, shared, cached) as a stacked area
    chart whose y-axis ends a little above the job's peak, with the KV pool's size as a
    line (or, when the pool is far above the peak, said at the top); False when
    matplotlib is missing. The PNG's "Description" says the axis and the pool."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timeline = report["timeline"]
    steps = [s["step"] for s in timeline]
    layers = [(k, [s[k] for s in timeline]) for k in ("private", "shared", "cached")]
    held = max((sum(v[i] for _, v in layers) for i in range(len(steps))), default=0)
    pool = report["num_blocks"]
    top = max(held * 1.15, 1)
    if pool <= top * 1.5:  # the pool fits the chart: show it as a line
        top = max(top, pool * 1.05)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    colors = ["#3b7dd8", "#2ca25f", "#f0a830"]
    ax.stackplot(steps, *[v for _, v in layers], labels=[k for k, _ in layers], colors=colors)
    if pool <= top:
        ax.axhline(pool, color="#c0392b", linestyle="--", label=f"KV pool ({pool:,} blocks)")
    else:
        ax.text(0.01, 0.97, f"KV pool: {pool:,} blocks, above the chart", color="#c0392b",
                transform=ax.transAxes, va="top")  # fmt: skip
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV blocks")
    ax.set_ylim(0, top)
    ax.set_title(
        f"KV blocks per step: peak {report['peak_blocks']} in use, "
        f"waste {report['kv_waste_peak']:.1%}, sharing saves {report['sharing_saving']:.1%}"
    )
    ax.margins(x=0)
    ax.legend(loc="upper right", ncols=4)
    fig.tight_layout()
    description = f"y-axis 0 to {top:.0f} KV blocks; KV pool {pool} blocks; peak held {held}"
    fig.savefig(path, metadata={"Description": description})
    plt.close(fig)
    return True


def _mib(n: int) -> str:
    return f"{n / _MiB:,.1f} MiB"

"""Host-device copies of whole engine steps: at most one device-to-host copy a step.

On CPU every tensor lives on the host, so a copy to the host is counted where it would be
one on a GPU: every call that reads a tensor's values into Python or numpy (`tolist`,
`item`, `numpy`, `cpu`, a conversion to bool, int or float, ...), seen through a
TorchFunctionMode around each step. The step makes exactly one (its readback) when some
sequence samples or scores, none otherwise. On CUDA (skipped without a GPU) whole steps
run under `torch.cuda.set_sync_debug_mode("error")`: the one wait of a step is on the
readback's event, which that mode allows; any other synchronising call raises.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pagedbatch import LLM, Record

# Tensor methods that hand a tensor's values to the host.
HOST_READS = {
    "tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
    "__array__", "__repr__", "__format__", "__complex__",
}  # fmt: skip


class HostReads(TorchFunctionMode):
    """Counts the calls that read tensor values on the host, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        if name in HOST_READS or (name == "to" and _to_host(args, kwargs)):
            self.calls.append(name)
        return func(*args, **kwargs)


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether a `Tensor.to(...)` call names the host: "cpu" written as such (a device
    object is another tensor's own device: the model's, which is the CPU here)."""
    return "cpu" in (*args[1:], kwargs.get("device"))


def reads_per_step(llm: LLM) -> list[tuple[int, int, int]]:
    """Wrap `llm`'s engine step: per step, (host reads, sequences sampled, choice scores)."""
    engine, counts = llm.engine, []
    step, sample = engine.step, engine._sample

    def counted_sample(out, batch, logits):
        sampled = sample(out, batch, logits)
        counted_sample.last = (len(sampled.rows.seqs), 0 if sampled.scores is None else 1)
        return sampled

    def counted_step():
        counted_sample.last = (0, 0)
        with HostReads() as mode:
            finished = step()
        counts.append((len(mode.calls), *counted_sample.last))
        return finished

    engine.step, engine._sample = counted_step, counted_sample
    return counts


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    # A small pool and budget: chunked prefill, preemption, evictions, cascade groups.
    return LLM(tiny_model_dirs["llama"], device="cpu", block_size=4, num_blocks=16,
               max_batch_tokens=32, max_num_seqs=6)  # fmt: skip


def job(vocab: int) -> list[Record]:
    """Records sharing a prefix, with their own lengths, some sampled, some with logprobs,
    n = 2 (forks), stop strings, EOS, choices."""
    shared = [5 + i % (vocab - 5) for i in range(9)]
    records = []
    for i in range(10):
        prompt = shared + [7 + (3 * i + j) % (vocab - 7) for j in range(i % 4 + 1)]
        params: dict = {"max_tokens": 6 + i % 3}
        if i % 3 == 1:
            params.update(temperature=0.9, top_p=0.8, top_k=20, seed=i)
        if i % 4 == 2:
            params["logprobs"] = 2
        if i == 5:
            params.update(n=2, temperature=1.0, seed=3)
        if i == 7:
            params["stop"] = ["a"]
        records.append(Record(id=i, prompt_token_ids=tuple(prompt), overrides=params))
    choices = {"choices": ["yes", "no way"]}
    records.append(Record(id="c", prompt_token_ids=(*shared, 9), overrides=choices))
    return records


def test_each_step_reads_the_device_back_once_when_it_samples_or_scores(llm):
    counts = reads_per_step(llm)
    outs = llm.generate(job(llm.model.config.vocab_size))
    assert all(o.error is None for o in outs)
    assert len(counts) > 10 and llm.stats().preemptions > 0
    for reads, sampled, scored in counts:
        assert reads == (1 if sampled or scored else 0), counts
    assert any(s for _, s, _ in counts) and any(c for _, _, c in counts)


def test_a_second_host_read_in_a_step_is_counted(llm, monkeypatch):
    from pagedbatch.engine import step_sampler

    real: Callable = step_sampler.sample_rows

    def with_an_extra_read(logits, params):
        tokens = real(logits, params)
        tokens.tolist()  # what the test must catch
        return tokens

    monkeypatch.setattr(step_sampler, "sample_rows", with_an_extra_read)
    counts = reads_per_step(llm)
    llm.generate([Record(id=0, prompt_token_ids=(5, 6, 7), overrides={"max_tokens": 3})])
    assert [reads for reads, sampled, _ in counts if sampled] == [2, 2, 2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [None, False])  # None: the CUDA default, graphs on
def test_cuda_engine_steps_never_synchronise_but_on_their_readback(tiny_model_dirs, graphs):
    llm = LLM(tiny_model_dirs["llama"], device="cuda", block_size=4, num_blocks=64,
              max_batch_tokens=32, max_num_seqs=6, cuda_graphs=graphs)  # fmt: skip
    records = job(llm.model.config.vocab_size)
    warm = llm.generate(records)  # Triton compiles, buffers grow, pinned memory is pinned
    engine, step = llm.engine, llm.engine.step

    def strict_step():
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.step = strict_step
    outs = llm.generate(records)
    assert all(o.error is None for o in warm + outs)
    assert llm.stats().steps > 20 and llm.stats().preemptions > 0

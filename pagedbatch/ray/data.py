"""pagedbatch for Ray Data users: a callable class for `Dataset.map_batches`.

    ds.map_batches(PagedBatchProcessor, fn_constructor_kwargs={"model": "Qwen/...",
                   "sampling": {"max_tokens": 64}}, concurrency=2, batch_size=256)

Each actor holds an ordinary `LLM`; a batch's rows (a `prompt` or `messages` column, an
`id` column for seeds that do not depend on batching, per-row sampling columns such as
`max_tokens`) come back with the columns `ray.data.llm` processors add: `generated_text`,
`num_input_tokens`, `num_generated_tokens`, and `__inference_error__` ("" when the row
ran). A row that cannot run raises, unless `should_continue_on_error`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from pagedbatch.outputs import RequestOutput
from pagedbatch.requests.records import FieldMap, parse_record
from pagedbatch.sampling_params import SamplingParams, short_repr

ERROR_COLUMN = "__inference_error__"  # ray.data.llm's name for it
_INTEGER_FIELDS = (  # sampling fields
    "max_tokens", "top_k", "seed", "n", "logprobs", "min_tokens", "reasoning_budget",
)  # fmt: skip


class RowError(ValueError):
    """A row that could not run, raised when `should_continue_on_error` is off."""


class PagedBatchProcessor:
    """Generates for the rows of each batch with one `LLM` (loaded once per actor).

    `model` and `engine` are `LLM(model, **engine)`'s arguments; `sampling` is a
    SamplingParams or its fields as a dict.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        sampling: SamplingParams | Mapping[str, Any] | None = None,
        should_continue_on_error: bool = False,
        prompt_column: str = "prompt",
        messages_column: str = "messages",
        id_column: str = "id",
        **engine: Any,
    ) -> None:
        from pagedbatch.llm import LLM

        self.llm = LLM(model, **engine)
        if not isinstance(sampling, SamplingParams):
            sampling = SamplingParams(**(sampling or {}))
        self.sampling = sampling
        self.should_continue_on_error = should_continue_on_error
        self.fields = FieldMap(prompt=prompt_column, messages=messages_column, id=id_column)

    def __call__(self, batch: Any) -> dict[str, Any]:
        """The batch's columns, with the generated ones added (rows in the same order)."""
        columns = _columns(batch)
        rows = enumerate(_rows(columns))
        records = [parse_record(row, default_id=i, fields=self.fields) for i, row in rows]
        outputs = self.llm.generate(records, self.sampling)
        errors = [_error_text(output) for output in outputs]
        if not self.should_continue_on_error:
            for output, error in zip(outputs, errors):
                if error:
                    raise RowError(f"row {short_repr(output.id)}: {error}")
        return {
            **columns,
            "generated_text": [output.text for output in outputs],
            "num_input_tokens": [output.prompt_tokens for output in outputs],
            "num_generated_tokens": [output.completion_tokens for output in outputs],
            ERROR_COLUMN: errors,
        }


def build_processor(
    model: str | None = None,
    *,
    concurrency: int = 1,
    batch_size: int = 256,
    num_gpus: float | None = None,
    **kwargs: Any,
) -> Callable[[Any], Any]:
    """A function Dataset -> Dataset that runs `PagedBatchProcessor(model, **kwargs)` on
    `concurrency` actors (each with `num_gpus`), `batch_size` rows at a time (a larger batch
    shares more prompt prefixes: rows are sorted by prompt within a batch)."""
    options: dict[str, Any] = {"concurrency": concurrency, "batch_size": batch_size}
    if num_gpus:
        options["num_gpus"] = num_gpus

    def apply(dataset: Any) -> Any:
        constructor = {"model": model, **kwargs}
        return dataset.map_batches(
            PagedBatchProcessor, fn_constructor_kwargs=constructor, **options
        )

    return apply


def _columns(batch: Any) -> dict[str, Any]:
    """Column name -> values, from a numpy-format batch (a dict) or a pandas one."""
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        return {name: batch[name].to_numpy() for name in batch.columns}
    return dict(batch)


def _rows(columns: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of `columns` as plain Python values (numpy scalars and arrays unwrapped).

    A row without a column that other rows have holds a null there (None, or NaN in a
    numeric column): it is left out of the row, which then takes the default. Such a
    column comes as floats, so an integer sampling field's 2.0 is read as 2.
    """
    size = len(next(iter(columns.values()))) if columns else 0
    rows = []
    for i in range(size):
        row = {}
        for name, values in columns.items():
            value = _plain(values[i])
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if name in _INTEGER_FIELDS and isinstance(value, float) and value.is_integer():
                value = int(value)
            row[name] = value
        rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    """numpy's str_, int64, and arrays (of message dicts) as Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _error_text(output: RequestOutput) -> str:
    return "" if output.error is None else f"{output.error.code}: {output.error.message}"

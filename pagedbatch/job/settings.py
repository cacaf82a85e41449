"""The settings of one `pagedbatch run`: built-in defaults < preset < command-line flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pagedbatch.constraint import Constraint
from pagedbatch.engine.config import EngineConfig, load_preset
from pagedbatch.requests.prompt_template import PromptTemplate
from pagedbatch.requests.records import FieldMap
from pagedbatch.sampling_params import SamplingParams, check_text

_ENGINE = {f.name for f in fields(EngineConfig)}
_SAMPLING = {f.name for f in fields(SamplingParams)}
ORDERS = ("completion", "input")
_JSON_OBJECTS = ("chat_template_kwargs", "logit_bias")  # settings a flag gives as JSON text
# The flags that constrain every record's output (one at most), as their parameters are named.
CONSTRAINT_FLAGS = {
    "json_schema": "--json-schema", "json_object": "--json", "regex": "--regex",
    "grammar": "--grammar",
}  # fmt: skip

DEFAULT_ORDER = "completion"
# The job seed: a record without a seed samples with derive_seed(job seed, record id), so a
# resumed or reordered run samples the same text. Fixed, so that this holds by default.
DEFAULT_JOB_SEED = 0


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a run, flat, as the CLI and the TOML presets spell them."""

    output: Path | None = None
    errors: Path | None = None
    split: str | None = None
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    id_field: str = "id"
    template: str | None = None
    system: str | None = None
    skip_invalid: bool = False
    lenient: bool = False
    order: str = DEFAULT_ORDER
    max_errors: int | None = None  # exit TOO_MANY_ERRORS when the output has more error lines
    max_error_rate: float | None = None  # ... or more than this fraction of its lines
    summary_json: Path | None = None  # the run's summary as JSON ("-": stdout)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(seed=DEFAULT_JOB_SEED))

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        for name in ("split", "prompt_field", "messages_field", "id_field", "template", "system"):
            check_text(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.template is not None:
            PromptTemplate(self.template)  # raises ValueError naming the problem
        if self.max_errors is not None and self.max_errors < 0:
            raise ValueError(f"max_errors must be >= 0, got {self.max_errors}")
        rate = self.max_error_rate
        if rate is not None and not 0 <= rate <= 1:
            raise ValueError(f"max_error_rate must be a fraction from 0 to 1, got {rate}")

    @property
    def fields(self) -> FieldMap:
        return FieldMap(
            prompt=self.prompt_field,
            messages=self.messages_field,
            id=self.id_field,
            template=None if self.template is None else PromptTemplate(self.template),
            system=self.system,
            lenient=self.lenient,
        )


def parse_choices(text: str) -> tuple[str, ...]:
    """`--choices`: comma-separated labels, each stripped ("positive, negative"), or a JSON
    list of strings to keep spaces and commas ('[" yes", " no"]')."""
    if text.lstrip().startswith("["):
        try:
            choices = json.loads(text)
        except ValueError as e:
            raise ValueError(f"choices: not a JSON list ({e})") from None
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"choices must be a JSON list of strings, got {text}")
        return tuple(choices)
    return tuple(part.strip() for part in text.split(","))


def parse_token_ids(text: str) -> tuple[int, ...]:
    """`--stop-token-ids 7,42`: comma-separated token ids."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"stop_token_ids must be token ids separated by commas, got {text!r}"
        ) from None


def parse_json_object(text: str, name: str) -> dict[str, Any]:
    """A flag whose value is a JSON object (--chat-template-kwargs '{"enable_thinking": false}')."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{name}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text}")
    return value


def flag_constraint(flags: dict[str, Any]) -> Constraint | None:
    """The constraint of `--json-schema SCHEMA` (inline JSON or a file), `--json`, `--regex
    PATTERN` or `--grammar FILE` in `flags` (None: none given); raises ValueError naming the
    flag."""
    given = [name for name in CONSTRAINT_FLAGS if flags.get(name) not in (None, False)]
    if len(given) > 1:
        names = " and ".join(CONSTRAINT_FLAGS[name] for name in given)
        raise ValueError(f"{names}: give one constraint, not several")
    if not given:
        return None
    name = given[0]
    value = flags[name]
    try:
        if name == "json_schema":
            return Constraint.json_schema(_inline_or_file(str(value)))
        if name == "json_object":
            return Constraint.json_object()
        if name == "regex":
            return Constraint.regex(value)
        return Constraint.grammar(_read_text(Path(value)))
    except ValueError as e:
        raise ValueError(f"{CONSTRAINT_FLAGS[name]}: {e}") from None


def _inline_or_file(value: str) -> str:
    """A JSON text given inline (it starts with `{`), or the text of the file it names."""
    if value.lstrip().startswith("{"):
        return value
    if not Path(value).exists():
        raise ValueError(f"no such file: {value} (a schema given inline starts with '{{')")
    return _read_text(Path(value))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def resolve_settings(flags: dict[str, Any], preset: str | None = None) -> RunSettings:
    """Merge a preset (name or TOML path) with the flags given; raises ValueError when invalid."""
    values = dict(load_preset(preset)) if preset else {}
    unknown = set(values) - _ENGINE - _SAMPLING - {f.name for f in fields(RunSettings)}
    if unknown:
        raise ValueError(f"config {preset}: unknown setting(s): {', '.join(sorted(unknown))}")
    values.update(flags)
    constraint = flag_constraint(values)
    for name in CONSTRAINT_FLAGS:
        values.pop(name, None)
    if constraint is not None:
        values["constraint"] = constraint
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    if isinstance(values.get("choices"), str):
        values["choices"] = parse_choices(values["choices"])
    if isinstance(values.get("stop_token_ids"), str):
        values["stop_token_ids"] = parse_token_ids(values["stop_token_ids"])
    for name in _JSON_OBJECTS:
        if isinstance(values.get(name), str):
            values[name] = parse_json_object(values[name], name)
    for name in ("output", "errors", "summary_json"):
        if isinstance(values.get(name), str):
            values[name] = Path(values[name])
    if values.get("system") is not None:
        values["chat"] = True  # a system message needs the chat template
    engine = EngineConfig(**{k: v for k, v in values.items() if k in _ENGINE})
    sampling = SamplingParams(
        **{"seed": DEFAULT_JOB_SEED, **{k: v for k, v in values.items() if k in _SAMPLING}}
    )
    rest = {k: v for k, v in values.items() if k not in _ENGINE and k not in _SAMPLING}
    return dataclasses.replace(RunSettings(**rest), engine=engine, sampling=sampling)

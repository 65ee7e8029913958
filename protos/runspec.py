"""RunSpec TOML <-> the RunSpec message: defaults, validation that names the bad key, and back to plain data.

The TOML schema is one pydantic model per section; ``RunSpecFile`` is the whole file.

>>> spec = parse_runspec('[run]\\nid = "demo"\\nmodel = "unet-digits-16"\\n')
>>> spec.training.micro_batch_size, spec.averaging.reducer
(32, 'mean')
>>> try:
...     parse_runspec('[run]\\nid = "demo"\\nmodel = "m"\\n[training]\\nlr = 1\\n')
... except RunSpecError as e:
...     print(e)  # doctest: +ELLIPSIS
unknown key 'training.lr' (known: micro_batch_size, learning_rate, ...)
"""

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from google.protobuf import json_format
from omi.protos import pb
from omi.protos.data_ref import DataRef, DataRefError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

# Strict: a value of the wrong TOML type is a mistake to refuse (micro_batch_size = '32' is not 32), except an
# integer for a float key, which pydantic's strict mode accepts as TOML writers expect.
_SECTION = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

# The message's integer fields are uint32 (seed: uint64): a larger value is refused here, naming its key, rather
# than failing inside protobuf.
PositiveInt = Annotated[int, Field(gt=0, le=2**32 - 1)]
NonNegativeInt = Annotated[int, Field(ge=0, le=2**32 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]


class RunSection(BaseModel):
    """``[run]``: what the run is; ``id`` and ``model`` have no default."""

    model_config = _SECTION

    id: str  # names the run in URLs, the admin CLI and the DHT prefix (omi-ID)
    name: str = ""  # shown on the dashboard; empty = the id
    description: str = ""  # free text for the dashboard
    model: str = Field(min_length=1)  # a name in omi.models' registry, e.g. unet-digits-16

    @field_validator("id")
    @classmethod
    def _id_is_a_slug(cls, value: str) -> str:
        if re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", value) is None:
            raise ValueError("Input should be lowercase letters, digits, '-' or '_', at most 63 characters")
        return value


class DataSection(BaseModel):
    """``[data]``: where the samples come from and how they are cut into shards."""

    model_config = _SECTION

    source: str = "builtin:digits"  # builtin:NAME | imagefolder:PATH | webdataset:PATTERN | manifest:FOLDER
    shard_size: PositiveInt = 64  # samples per numbered shard
    resolution: PositiveInt = 16  # side of the square images fed to the model

    @field_validator("source")
    @classmethod
    def _source_has_a_known_kind(cls, value: str) -> str:
        try:
            DataRef.parse(value)
        except DataRefError as e:
            raise ValueError("Input should be builtin:NAME, imagefolder:PATH, webdataset:PATTERN or manifest:FOLDER "
                             f"(omi-data prepare): {e}") from None
        return value


class TrainingSection(BaseModel):
    """``[training]``: the optimizer and the work handed to each node."""

    model_config = _SECTION

    micro_batch_size: PositiveInt = 32  # samples in one inner step on a node
    learning_rate: PositiveFloat = 1e-3  # AdamW learning rate
    weight_decay: NonNegativeFloat = 0.0  # AdamW weight decay
    # what the model predicts: a UNet the noise (epsilon) or v; a text-to-image transformer the flow (noise - x0)
    prediction_type: Literal["epsilon", "v_prediction", "flow"] = "epsilon"
    num_train_timesteps: PositiveInt = 1000  # T of the DDPM noise schedule
    max_rounds: NonNegativeInt = 0  # 0 = no limit
    shards_per_assignment: PositiveInt = 4  # shards handed to one node per round
    seed: Seed = 0  # base of every micro-batch seed, so validators can recompute a micro-batch
    max_grad_norm: NonNegativeFloat = 1.0  # gradient clipping; 0 = no clipping


class AveragingSection(BaseModel):
    """``[averaging]``: how hivemind forms groups and reduces the nodes' pseudo-gradients."""

    model_config = _SECTION

    matchmaking_time: PositiveFloat = 3.0  # seconds spent forming an averaging group
    averaging_timeout: PositiveFloat = 30.0  # seconds before an all-reduce is abandoned
    reducer: Literal["mean", "centered_clip"] = "mean"  # centered_clip bounds what one bad peer can move
    clip_tau: PositiveFloat = 1.0  # clipping radius of centered_clip
    clip_iterations: PositiveInt = 3  # fixed-point iterations of centered_clip


class RoundsSection(BaseModel):
    """``[rounds]``: DiLoCo rounds — H local inner steps per node, then one averaged outer step.

    Each node takes its inner steps (AdamW of ``[training]``, one per micro-batch) from the round's parameters
    θ_r; the round closes when the swarm has trained ``inner_steps × micro_batch_size`` samples per training
    peer; the peers average their pseudo-gradients θ_r − θ_local (weighted by samples, compressed as
    ``compression``, reduced as ``[averaging] reducer``) and all apply the same outer Nesterov SGD step.
    Rounds are the only training mode: per-step training (``inner_steps = 0``) was retired.
    """

    model_config = _SECTION

    inner_steps: PositiveInt = 20  # H: inner steps per node per round (0, per-step training, is refused)
    outer_learning_rate: PositiveFloat = 0.7  # outer SGD learning rate (DiLoCo: 0.7)
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # outer SGD momentum (DiLoCo: 0.9)
    outer_nesterov: bool = True  # Nesterov momentum (DiLoCo's outer optimizer)
    overlap: bool = False  # average round r while round r+1 computes; its outer step lands one round late
    # of Δ; sparse4bit: 4-bit values, their rounding error kept with the residual (see topk_density)
    compression: Literal["none", "float16", "scaled_float16", "uniform8bit", "sparse8bit", "sparse4bit"] = \
        "uniform8bit"
    # < 1: each node sends only this share of its pseudo-gradient's entries (the largest), the rest is kept and
    # added to its next round's (error feedback); needs compression = "sparse8bit" or "sparse4bit", which send
    # only nonzeros
    topk_density: Annotated[float, Field(gt=0, le=1)] = 1.0
    # > 0: a round also closes this many seconds after it began, however few samples the swarm trained (slow
    # volunteers); 0: it closes on samples only
    max_round_seconds: NonNegativeFloat = 0.0


class VerificationSection(BaseModel):
    """``[verification]``: how often contributions are audited and what a failed audit costs."""

    model_config = _SECTION

    audit_rate: Annotated[float, Field(ge=0, le=1)] = 0.2  # fraction of rounds a validator replays a segment of
    max_strikes: PositiveInt = 2  # failed audits before a node is banned
    audit_window_rounds: PositiveInt = 5  # rounds within which a contribution may still be audited
    sketch_size: PositiveInt = 1024  # floats in each micro-batch's gradient sketch
    segment_steps: PositiveInt = 5  # inner steps between two committed training-state hashes (an audit replays one)


class CheckpointSection(BaseModel):
    """``[checkpoints]``: how often the model is saved and how many saves are kept."""

    model_config = _SECTION

    every_rounds: PositiveInt = 5  # rounds between checkpoints
    keep: PositiveInt = 3  # latest checkpoints kept
    milestone_every: NonNegativeInt = 50  # rounds between checkpoints kept forever; 0 = none
    preview_samples: PositiveInt = 16  # images drawn for each checkpoint's preview


class LivenessSection(BaseModel):
    """``[liveness]``: heartbeats and access tokens."""

    model_config = _SECTION

    heartbeat_interval: PositiveFloat = 5.0  # seconds between a node's heartbeats
    heartbeat_timeout: PositiveFloat = 30.0  # seconds without a heartbeat before a node counts as offline
    token_ttl: PositiveFloat = 3600.0  # seconds an access token is valid


def _present(doc: Any, keys: dict[tuple[str, str], str]) -> list[tuple[str, str, str]]:
    """(section, key, what to write instead) of each of ``keys`` that the TOML document ``doc`` holds."""
    return [(section, key, instead) for (section, key), instead in keys.items()
            if isinstance(doc, dict) and isinstance(doc.get(section), dict) and key in doc[section]]


class RunSpecFile(BaseModel):
    """A whole RunSpec TOML file; every section but ``[run]`` may be left out."""

    # An absent section is validated as an empty table, so a missing [run] is reported as 'run.id'.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    run: RunSection = Field(default_factory=dict)
    data: DataSection = Field(default_factory=dict)
    training: TrainingSection = Field(default_factory=dict)
    averaging: AveragingSection = Field(default_factory=dict)
    rounds: RoundsSection = Field(default_factory=dict)
    verification: VerificationSection = Field(default_factory=dict)
    checkpoints: CheckpointSection = Field(default_factory=dict)
    liveness: LivenessSection = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_renamed_keys(cls, doc: Any) -> Any:
        # A key that still says "epoch" for a round gets a message that names its new name, not "unknown key".
        for section, key, instead in _present(doc, RENAMED_KEYS):
            raise ValueError(f"'{section}.{key}' was renamed: write '{section}.{instead}' instead (the same "
                             "value: it always counted rounds)")
        return doc

    @model_validator(mode="before")
    @classmethod
    def _no_per_step_training(cls, doc: Any) -> Any:
        # Per-step training was retired (issue 20): its keys get a message that says what to write instead, not
        # "unknown key"; checked first, so an old run file gets this message before any other.
        for section, key, instead in _present(doc, RETIRED_KEYS):
            raise ValueError(f"'{section}.{key}' belonged to per-step training, which was retired: {instead}")
        rounds = doc.get("rounds") if isinstance(doc, dict) else None
        if isinstance(rounds, dict) and type(rounds.get("inner_steps")) is int and rounds["inner_steps"] == 0:
            raise ValueError("'rounds.inner_steps' = 0 asks for per-step training, which was retired: every run "
                             "trains in DiLoCo rounds; set it to H >= 1 inner steps per node per round (the digits "
                             "run uses 20)")
        return doc

    @model_validator(mode="after")
    def _sparse_compression_goes_with_top_k(self) -> "RunSpecFile":
        # Runs only once every key is valid, so it is the last check; its message names the key itself.
        if (self.rounds.topk_density < 1) != (self.rounds.compression in ("sparse8bit", "sparse4bit")):
            raise ValueError("bad value for 'rounds.topk_density': top-k (topk_density < 1) and a sparse "
                             "rounds.compression (\"sparse8bit\" or \"sparse4bit\") go together")
        return self


# The keys of per-step training (retired in issue 20) and what a run file says instead.
RETIRED_KEYS = {
    ("training", "target_batch_size"): "remove it; a round closes after [rounds] inner_steps × micro_batch_size "
                                       "samples per training peer",
    ("averaging", "compression"): "remove it; the pseudo-gradients are compressed as [rounds] compression",
    ("averaging", "load_state_from_peers"): "remove it; a late or out-of-sync peer always loads θ_r from peers "
                                            "(checked against the coordinator's witness)",
    ("verification", "micro_batches_per_audit"): "remove it; an audit replays one segment of "
                                                 "[verification] segment_steps inner steps",
}


# The keys that called the round an epoch, and their names now.
RENAMED_KEYS = {
    ("training", "max_epochs"): "max_rounds",
    ("verification", "audit_window_epochs"): "audit_window_rounds",
    ("checkpoints", "every_epochs"): "every_rounds",
}


class RunSpecError(ValueError):
    """A RunSpec TOML that cannot be used; the message names the key."""


_TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool"}


def _first_error(e: ValidationError, doc: dict[str, Any]) -> RunSpecError:
    """The first failed check as a RunSpecError naming its key.

    "First" is reading order: the document's sections top to bottom, then section by section its unknown keys
    before its known ones (pydantic lists a model's extra keys after its fields, and top-level ones last).
    """
    sections = list(RunSpecFile.model_fields)

    def reading_order(error) -> tuple[int, int, bool]:
        loc = error["loc"]
        if not loc:  # the cross-key check, which pydantic only reaches when nothing else failed
            return (2, 0, False)
        if len(loc) == 1:  # an unknown section, or a section that is not a table
            return (0, list(doc).index(loc[0]), False)
        return (1, sections.index(loc[0]), error["type"] != "extra_forbidden")

    error = min(e.errors(), key=reading_order)
    loc, kind, value = error["loc"], error["type"], error["input"]
    name = ".".join(map(str, loc))
    reason = str(error["ctx"]["error"]) if kind == "value_error" else error["msg"]
    if not loc:
        return RunSpecError(reason)
    if kind == "extra_forbidden" and len(loc) == 1:
        return RunSpecError(f"unknown section '{name}' (known: {', '.join(sections)})")
    if kind == "extra_forbidden":
        known = RunSpecFile.model_fields[loc[0]].annotation.model_fields
        return RunSpecError(f"unknown key '{name}' (known: {', '.join(known)})")
    if kind == "model_type":
        return RunSpecError(f"'{name}' must be a table")
    if kind == "missing":
        return RunSpecError(f"missing required key '{name}'")
    if kind in _TYPE_NAMES:
        return RunSpecError(f"'{name}' must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}")
    return RunSpecError(f"bad value for '{name}': {value!r} ({reason})")


def parse_runspec(text: str) -> pb.RunSpec:
    """Parse and validate RunSpec TOML text; raise RunSpecError naming the first bad key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RunSpecError(f"not valid TOML: {e}") from e
    try:
        file = RunSpecFile.model_validate(doc)
    except ValidationError as e:
        raise _first_error(e, doc) from None
    run = file.run
    return pb.RunSpec(
        run_id=run.id,
        name=run.name or run.id,
        description=run.description,
        model=run.model,
        dht_prefix=f"omi-{run.id}",
        **file.model_dump(exclude={"run"}),
    )


def load_runspec(path: str | Path) -> pb.RunSpec:
    """Read and parse a RunSpec TOML file; a missing file is a RunSpecError naming the path."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RunSpecError(f"cannot read RunSpec {path}: {e.strerror}") from e
    return parse_runspec(text)


def runspec_to_dict(spec: pb.RunSpec) -> dict[str, Any]:
    """The RunSpec as plain data (for JSON views and the dashboard)."""
    return json_format.MessageToDict(spec, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

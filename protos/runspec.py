"""RunSpec TOML <-> the RunSpec message: defaults, validation that names the bad key, and back to TOML.

>>> spec = parse_runspec('[run]\\nid = "demo"\\nmodel = "unet-digits-16"\\n')
>>> spec.training.micro_batch_size, spec.averaging.reducer
(32, 'mean')
>>> parse_runspec('[run]\\nid = "demo"\\nmodel = "m"\\n[training]\\nlr = 1\\n')
Traceback (most recent call last):
...
omi.protos.runspec.RunSpecError: unknown key 'training.lr' (known: ...)
"""

import re
from pathlib import Path
from typing import Any

import tomllib
from google.protobuf import json_format
from omi.protos import pb

# section -> key -> (default, check, what the check wants). Every key of the RunSpec TOML is here.
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "between 0 and 1")
_ANY = (lambda v: True, "")


def _one_of(*options):
    return (lambda v: v in options, "one of " + ", ".join(options))


SCHEMA: dict[str, dict[str, tuple[Any, tuple]]] = {
    "run": {
        "id": (None, (lambda v: re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", v) is not None,
                      "lowercase letters, digits, '-' or '_', at most 63 characters")),
        "name": ("", _ANY),
        "description": ("", _ANY),
        "model": (None, (lambda v: bool(v), "a model name")),
    },
    "data": {
        "source": ("builtin:digits", (lambda v: v.split(":", 1)[0] in ("builtin", "imagefolder", "webdataset")
                                      and ":" in v, "builtin:NAME, imagefolder:PATH or webdataset:PATTERN")),
        "shard_size": (64, _POSITIVE),
        "resolution": (16, _POSITIVE),
    },
    "training": {
        "micro_batch_size": (32, _POSITIVE),
        "target_batch_size": (256, _POSITIVE),
        "learning_rate": (1e-3, _POSITIVE),
        "weight_decay": (0.0, _NON_NEGATIVE),
        "prediction_type": ("epsilon", _one_of("epsilon", "v_prediction")),
        "num_train_timesteps": (1000, _POSITIVE),
        "max_epochs": (0, _NON_NEGATIVE),
        "shards_per_assignment": (4, _POSITIVE),
        "seed": (0, _NON_NEGATIVE),
        "max_grad_norm": (1.0, _NON_NEGATIVE),
    },
    "averaging": {
        "matchmaking_time": (3.0, _POSITIVE),
        "averaging_timeout": (30.0, _POSITIVE),
        "compression": ("none", _one_of("none", "float16", "scaled_float16", "uniform8bit")),
        "reducer": ("mean", _one_of("mean", "centered_clip")),
        "clip_tau": (1.0, _POSITIVE),
        "clip_iterations": (3, _POSITIVE),
        "load_state_from_peers": (True, _ANY),
    },
    "verification": {
        "audit_rate": (0.2, _FRACTION),
        "micro_batches_per_audit": (2, _POSITIVE),
        "max_strikes": (2, _POSITIVE),
        "audit_window_epochs": (5, _POSITIVE),
        "sketch_size": (1024, _POSITIVE),
    },
    "checkpoints": {
        "every_epochs": (5, _POSITIVE),
        "keep": (3, _POSITIVE),
        "milestone_every": (50, _NON_NEGATIVE),
        "preview_samples": (16, _POSITIVE),
    },
    "liveness": {
        "heartbeat_interval": (5.0, _POSITIVE),
        "heartbeat_timeout": (30.0, _POSITIVE),
        "token_ttl": (3600.0, _POSITIVE),
    },
}

# TOML section -> RunSpec field holding it ("run" keys sit on the RunSpec itself)
_RUN_FIELDS = {"id": "run_id", "name": "name", "description": "description", "model": "model"}


class RunSpecError(ValueError):
    """A RunSpec TOML that cannot be used; the message names the key."""


def _check_type(key: str, value: Any, default: Any) -> Any:
    expected = type(default) if default is not None else str
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise RunSpecError(f"'{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_runspec(text: str) -> pb.RunSpec:
    """Parse and validate RunSpec TOML text; raise RunSpecError naming the first bad key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RunSpecError(f"not valid TOML: {e}") from e
    spec = pb.RunSpec()
    for section, value in doc.items():
        if section not in SCHEMA:
            raise RunSpecError(f"unknown section '{section}' (known: {', '.join(SCHEMA)})")
        if not isinstance(value, dict):
            raise RunSpecError(f"'{section}' must be a table")
    for section, keys in SCHEMA.items():
        given = doc.get(section, {})
        for key in given:
            if key not in keys:
                raise RunSpecError(f"unknown key '{section}.{key}' (known: {', '.join(keys)})")
        for key, (default, (check, wants)) in keys.items():
            name = f"{section}.{key}"
            if key not in given:
                if default is None:
                    raise RunSpecError(f"missing required key '{name}'")
                value = default
            else:
                value = _check_type(name, given[key], default)
                if not check(value):
                    raise RunSpecError(f"bad value for '{name}': {value!r} (must be {wants})")
            if section == "run":
                setattr(spec, _RUN_FIELDS[key], value)
            else:
                setattr(getattr(spec, section), key, value)
    if spec.training.target_batch_size < spec.training.micro_batch_size:
        raise RunSpecError("bad value for 'training.target_batch_size': smaller than training.micro_batch_size")
    if not spec.name:
        spec.name = spec.run_id
    spec.dht_prefix = f"omi-{spec.run_id}"
    return spec


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

"""RunSpec TOML parsing: defaults, and every refusal names the key."""

import pytest
from omi.protos.runspec import RunSpecError, load_runspec, parse_runspec

BASE = '[run]\nid = "demo"\nmodel = "unet-digits-16"\n'


def test_default_run_file_parses():
    spec = load_runspec("examples/runs/digits.toml")
    assert spec.run_id == "digits" and spec.model == "unet-digits-16"
    assert spec.data.source == "builtin:digits" and spec.dht_prefix == "omi-digits"


@pytest.mark.parametrize(
    "extra, key",
    [
        ("[training]\nlr = 0.1\n", "training.lr"),
        ("[trainng]\nseed = 1\n", "trainng"),
        ("[training]\nmicro_batch_size = 0\n", "training.micro_batch_size"),
        ("[training]\nmicro_batch_size = 'big'\n", "training.micro_batch_size"),
        ("[averaging]\nreducer = 'median'\n", "averaging.reducer"),
        ("[verification]\naudit_rate = 1.5\n", "verification.audit_rate"),
        ("[data]\nsource = 'ftp://x'\n", "data.source"),
        ("[training]\ntarget_batch_size = 8\n", "training.target_batch_size"),
    ],
)
def test_bad_key_or_value_is_named(extra, key):
    with pytest.raises(RunSpecError, match=key.replace(".", r"\.")):
        parse_runspec(BASE + extra)


def test_missing_required_and_bad_run_id():
    with pytest.raises(RunSpecError, match="run.model"):
        parse_runspec('[run]\nid = "demo"\n')
    with pytest.raises(RunSpecError, match="run.id"):
        parse_runspec('[run]\nid = "Bad Id!"\nmodel = "m"\n')


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(RunSpecError, match="not valid TOML"):
        parse_runspec("[run\n")
    with pytest.raises(RunSpecError, match="nope.toml"):
        load_runspec(tmp_path / "nope.toml")


def test_int_accepted_for_float():
    assert parse_runspec(BASE + "[training]\nlearning_rate = 1\n").training.learning_rate == 1.0

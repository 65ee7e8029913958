"""RunSpec TOML parsing: defaults, and every refusal names the key."""

import pytest
from omi.protos.runspec import RunSpecError, load_runspec, parse_runspec, runspec_to_dict

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
        ("[rounds]\ninner_steps = 0\n", "rounds.inner_steps"),
    ],
)
def test_bad_key_or_value_is_named(extra, key):
    with pytest.raises(RunSpecError, match=key.replace(".", r"\.")):
        parse_runspec(BASE + extra)


@pytest.mark.parametrize("section, old, new, value", [
    ("training", "max_epochs", "max_rounds", 40),
    ("verification", "audit_window_epochs", "audit_window_rounds", 3),
    ("checkpoints", "every_epochs", "every_rounds", 10),
])
def test_a_key_that_said_epoch_is_refused_with_its_new_name(section, old, new, value):
    with pytest.raises(RunSpecError) as refused:
        parse_runspec(BASE + f"[{section}]\n{old} = {value}\n")
    assert str(refused.value) == (f"'{section}.{old}' was renamed: write '{section}.{new}' instead (the same value: "
                                  "it always counted rounds)")
    assert getattr(getattr(parse_runspec(BASE + f"[{section}]\n{new} = {value}\n"), section), new) == value


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


def test_defaults_fill_every_section():
    spec = parse_runspec(BASE)
    assert (spec.name, spec.description, spec.dht_prefix) == ("demo", "", "omi-demo")
    assert runspec_to_dict(spec) == {
        "run_id": "demo", "name": "demo", "description": "", "model": "unet-digits-16",
        "data": {"source": "builtin:digits", "shard_size": 64, "resolution": 16},
        "training": {"micro_batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.0,
                     "prediction_type": "epsilon", "num_train_timesteps": 1000, "max_rounds": 0,
                     "shards_per_assignment": 4, "seed": "0", "max_grad_norm": 1.0},
        "averaging": {"matchmaking_time": 3.0, "averaging_timeout": 30.0, "reducer": "mean",
                      "clip_tau": 1.0, "clip_iterations": 3},
        "rounds": {"inner_steps": 20, "outer_learning_rate": 0.7, "outer_momentum": 0.9, "outer_nesterov": True,
                   "overlap": False, "compression": "uniform8bit", "topk_density": 1.0,
                   "max_round_seconds": 0.0},
        "verification": {"audit_rate": 0.2, "max_strikes": 2,
                         "audit_window_rounds": 5, "sketch_size": 1024, "segment_steps": 5},
        "checkpoints": {"every_rounds": 5, "keep": 3, "milestone_every": 50, "preview_samples": 16},
        "liveness": {"heartbeat_interval": 5.0, "heartbeat_timeout": 30.0, "token_ttl": 3600.0},
        "coordinator_public_key": "", "initial_peers": [], "dht_prefix": "omi-demo", "witnessed": False,
    }


@pytest.mark.parametrize(
    "extra, key",
    [
        ("[training]\nlearning_rate = 'fast'\n", "training.learning_rate"),
        ("[training]\nlearning_rate = true\n", "training.learning_rate"),
        ("[training]\nlearning_rate = nan\n", "training.learning_rate"),
        ("[training]\nmicro_batch_size = 1.0\n", "training.micro_batch_size"),
        ("[training]\nseed = true\n", "training.seed"),
        ("[training]\nprediction_type = 1\n", "training.prediction_type"),
        ("[averaging]\nclip_iterations = 1.5\n", "averaging.clip_iterations"),
        ("[data]\nsource = 'imagefolder'\n", "data.source"),
        ("[training.schedule]\nwarmup = 10\n", "training.schedule"),
        ("[rounds]\ninner_steps = -1\n", "rounds.inner_steps"),
        ("[rounds]\nouter_momentum = 1.0\n", "rounds.outer_momentum"),
        ("[rounds]\nouter_learning_rate = 0\n", "rounds.outer_learning_rate"),
        ("[rounds]\ncompression = 'topk'\n", "rounds.compression"),
        ("[rounds]\noverlap = 'yes'\n", "rounds.overlap"),
        ("[rounds]\ntopk_density = 0\n", "rounds.topk_density"),
        ("[rounds]\nmax_round_seconds = -1.0\n", "rounds.max_round_seconds"),
        ("[rounds]\nmax_round_seconds = inf\n", "rounds.max_round_seconds"),
        ("[rounds]\ntopk_density = 1.5\n", "rounds.topk_density"),
        ("[rounds]\ntopk_density = 0.02\n", "rounds.topk_density"),  # dense compression: top-k is pointless
        ("[rounds]\ncompression = 'sparse8bit'\n", "rounds.topk_density"),  # dense Δ in a sparse codec
        ("[rounds]\ncompression = 'sparse4bit'\n", "rounds.topk_density"),
        ("[rounds]\ncompression = 'sparse2bit'\ntopk_density = 0.03\n", "rounds.compression"),
    ],
)
def test_wrong_type_or_value_is_named_and_never_coerced(extra, key):
    with pytest.raises(RunSpecError, match=key.replace(".", r"\.")):
        parse_runspec(BASE + extra)


def test_bad_run_keys_are_named():
    with pytest.raises(RunSpecError, match=r"'run\.name' must be str"):
        parse_runspec(BASE + "name = 3\n")
    with pytest.raises(RunSpecError, match=r"'run\.model'"):
        parse_runspec('[run]\nid = "demo"\nmodel = ""\n')


def test_boundaries_are_accepted():
    spec = parse_runspec(BASE + "[training]\nmax_rounds = 0\n[rounds]\ninner_steps = 1\n"
                                "[verification]\naudit_rate = 1\n")
    assert spec.rounds.inner_steps == 1 and spec.verification.audit_rate == 1.0
    assert parse_runspec(BASE + "[verification]\naudit_rate = 0\n").verification.audit_rate == 0.0
    rounds = parse_runspec(BASE + "[rounds]\ncompression = 'sparse4bit'\ntopk_density = 0.03\n").rounds
    assert (rounds.compression, rounds.topk_density) == ("sparse4bit", 0.03)


def test_missing_run_table_and_non_table_section():
    with pytest.raises(RunSpecError, match=r"missing required key 'run\.id'"):
        parse_runspec("[training]\nseed = 1\n")
    with pytest.raises(RunSpecError, match=r"missing required key 'run\.id'"):
        parse_runspec('[run]\nmodel = "m"\n')
    with pytest.raises(RunSpecError, match="'training' must be a table"):
        parse_runspec("training = 3\n" + BASE)
    with pytest.raises(RunSpecError, match="'training' must be a table"):
        parse_runspec(BASE + "[[training]]\nseed = 1\n")


def test_first_bad_key_in_reading_order():
    # sections are checked before keys, and a section's unknown keys before its bad values
    with pytest.raises(RunSpecError, match="unknown section 'trainng'"):
        parse_runspec(BASE + "[training]\nseed = -1\n[trainng]\nseed = 1\n")
    with pytest.raises(RunSpecError, match=r"unknown key 'training\.foo'"):
        parse_runspec(BASE + "[training]\nseed = -1\nfoo = 1\n")
    with pytest.raises(RunSpecError, match=r"'data\.shard_size'"):
        parse_runspec(BASE + "[training]\nseed = -1\n[data]\nshard_size = 0\n")
    # the top-k check across keys runs once every key is valid
    with pytest.raises(RunSpecError, match=r"'averaging\.reducer'"):
        parse_runspec(BASE + "[rounds]\ntopk_density = 0.02\n[averaging]\nreducer = 'median'\n")


@pytest.mark.parametrize("extra, key", [
    ("[training]\nmicro_batch_size = 5000000000\n", "training.micro_batch_size"),
    ("[training]\nseed = -1\n", "training.seed"),
    ("[training]\nlearning_rate = inf\n", "training.learning_rate"),
    ("[liveness]\ntoken_ttl = inf\n", "liveness.token_ttl"),
])
def test_values_the_message_cannot_hold_are_refused_with_the_key(extra, key):
    with pytest.raises(RunSpecError, match=key.replace(".", r"\.")):
        parse_runspec(BASE + extra)


@pytest.mark.parametrize("extra, key", [
    ("[rounds]\ninner_steps = 0\n", "rounds.inner_steps"),
    ("[training]\ntarget_batch_size = 256\n", "training.target_batch_size"),
    ("[averaging]\ncompression = 'float16'\n", "averaging.compression"),
    ("[averaging]\nload_state_from_peers = true\n", "averaging.load_state_from_peers"),
    ("[verification]\nmicro_batches_per_audit = 2\n", "verification.micro_batches_per_audit"),
])
def test_per_step_training_is_refused_with_what_to_write_instead(extra, key):
    with pytest.raises(RunSpecError) as refused:
        parse_runspec(BASE + extra)
    message = str(refused.value)
    assert f"'{key}'" in message and "per-step training, which was retired" in message
    assert "remove it" in message or "set it to" in message, message  # says what to write instead


def test_the_shipped_runs_train_in_rounds():
    for name in ("digits", "digits-captioned"):
        assert load_runspec(f"examples/runs/{name}.toml").rounds.inner_steps >= 1

"""Shared fixtures: subprocesses a test started die with their process groups; one torch thread for tiny models;
a test coordinator's key and DHT peers holding its tokens; the CLIs' default state dir (OMI_HOME) is a temporary
folder, never the home of whoever runs the tests."""

import os
import tempfile

import pytest
import torch
from processes import reap_all

# inherited by every CLI a test starts. One per pytest process: pytest-xdist's workers inherit the environment of the
# controller, which loaded this file first; a worker makes its own (known coordinators and node keys are not shared).
# An OMI_HOME set by whoever runs the tests is kept.
_home_owner = os.environ.get("OMI_TEST_HOME_OWNER")  # the pid of the pytest process that made OMI_HOME, if one did
if "OMI_HOME" not in os.environ or _home_owner not in (None, str(os.getpid())):
    os.environ["OMI_HOME"] = tempfile.mkdtemp(prefix="omi-home-")
    os.environ["OMI_TEST_HOME_OWNER"] = str(os.getpid())


# In-process tests of 20-60 s each (fresh clone, 2 cores, 2026-12-07: the lock-step CenteredClip swarm 59 s,
# train-local 51 s, the attacks under segment audits 42 s, the data CLI 31 s, the other-process recompute 29 s). In
# file order their files came last, and the phase could end with one pytest-xdist worker running one of them while
# the other idled; their files go first, so they overlap with the many short tests.
LONG_FIRST = ("test_verification.py", "test_train_local.py", "test_data_prepare.py", "test_models_microbatch.py",
              "test_dashboard_api.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: file order otherwise


@pytest.fixture(autouse=True)
def _reap_processes():
    """Kill what the test started: the processes this pytest process keeps in its own list (tests/processes.py),
    never a search by name, so a pytest-xdist worker leaves the other worker's processes alone."""
    yield
    reap_all()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test may set torch's thread count (determinism across thread counts); the next test gets it back."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on 2 shared cores: one torch thread is fastest, two wait on each other when other jobs run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coordinator_key():
    """The signing key of a test coordinator (one per test module)."""
    from omi.protos import signing

    return signing.generate_key()


@pytest.fixture
def swarm_dht(coordinator_key, tmp_path):
    """``(spec, bootstrap, [peer, peer])``: the coordinator's bootstrap DHT peer and two token holders, in-process."""
    from swarm_helpers import dht_peers  # hivemind: imported only by tests that use a swarm

    with dht_peers(coordinator_key, tmp_path) as peers:
        yield peers


def _serve_fast_run(directory, *, swarm: bool = True, shared: bool = False):
    """A real ``omi-coordinator serve`` process with the fast test run (``processes.FAST``), drawing no checkpoints,
    in ``directory``; killed with its process group on exit. ``swarm``: the run's swarm peers (bootstrap, witness,
    built-in validator) start too, and the run's witness is waited for; without, ``--swarm-host ''``;
    ``shared``: it outlives each test (a fixture of wider scope)."""
    from processes import NO_CHECKPOINTS, ServeProcess, fast_run, kill_group, outlive_the_test

    run_file = directory / "run.toml"
    run_file.write_text(fast_run(checkpoints=NO_CHECKPOINTS))
    server = ServeProcess(directory / "coordinator", directory / "coordinator.log", run_file=run_file,
                          extra=() if swarm else ("--swarm-host", ""))
    if shared:
        outlive_the_test(server.proc)
    yield server
    kill_group(server.proc)


@pytest.fixture
def coordinator(tmp_path):
    """A real ``omi-coordinator serve`` process with the fast test run, its witness up (:func:`_serve_fast_run`)."""
    yield from _serve_fast_run(tmp_path)


@pytest.fixture
def serving_coordinator(tmp_path):
    """As :func:`coordinator`, without the run's swarm peers: for tests of what the API answers (their start costs
    about 15 CPU-seconds of imports, scripts/cpu_by_process.py)."""
    yield from _serve_fast_run(tmp_path, swarm=False)


@pytest.fixture(scope="module")
def module_coordinator(tmp_path_factory):
    """As :func:`coordinator`, one for the tests of a module (each start costs ~15 s of the slow phase)."""
    yield from _serve_fast_run(tmp_path_factory.mktemp("coordinator"), shared=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the session (tests/postgres.py); skips where PostgreSQL is not installed,
    unless OMI_REQUIRE_POSTGRES=1 (CI installs it: there a missing server is a failure)."""
    from postgres import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("OMI_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required (OMI_REQUIRE_POSTGRES=1) but initdb was not found")
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """Each store test runs on SQLite (None: the state dir's file) and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture(scope="session")
def captioned_digits(tmp_path_factory):
    """The captioned digits as examples/runs/digits-captioned.toml expects them: toy frozen parts (the autoencoder
    fitted briefly) and latent shards of 64 samples; prepared once per session (~25 s)."""
    from omi.models.prepare import prepare
    from omi.models.toy_parts import make_toy_parts

    root = tmp_path_factory.mktemp("captioned")
    parts, _ = make_toy_parts("sana-digits", root / "parts", steps=20)
    prepare("builtin:digits", parts, root / "data", model="sana-digits", shard_size=64)
    return root / "data"

"""The node session against a real coordinator in process: refusals become clear errors with exit codes."""

import pytest
from coordinator_helpers import ServerThread, run_toml
from omi.node.cli import app
from omi.node.session import NodeError, NodeSession
from typer.testing import CliRunner


def test_validator_with_no_running_run_exits_4_and_says_why(tmp_path):
    # once a bare StopIteration from next() without a default
    with ServerThread(tmp_path / "state") as server:
        result = CliRunner().invoke(app, ["validate", "--coordinator", server.address,
                                          "--state-dir", str(tmp_path / "validator")])
    assert result.exit_code == 4, result.output
    assert not isinstance(result.exception, StopIteration)


def test_session_names_the_run_it_cannot_choose_and_registers_with_the_one_running(tmp_path):
    with ServerThread(tmp_path / "state") as server:
        with pytest.raises(NodeError, match=r"0 running runs \(none\)") as info:
            NodeSession(server.address, tmp_path / "a", connect_attempts=1).open()
        assert info.value.exit_code == 4
    with ServerThread(tmp_path / "state2", run_toml("solo")) as server:
        session = NodeSession(server.address, tmp_path / "b", connect_attempts=1)
        try:
            spec = session.open(display_name="b")
            assert spec.run_id == "solo" and session.registered
            assert session.tokens().node_id == session.node_id and session.renew_token_if_needed()
        finally:
            session.close()


def test_unknown_run_exits_4_and_unreachable_coordinator_exits_3(tmp_path):
    with ServerThread(tmp_path / "state", run_toml("solo")) as server:
        with pytest.raises(NodeError) as info:
            NodeSession(server.address, tmp_path / "a", connect_attempts=1).open(run_id="nope")
        assert info.value.exit_code == 4
        address = server.address
    with pytest.raises(NodeError) as info:  # the server is gone now
        NodeSession(address, tmp_path / "b", connect_attempts=1).open(run_id="solo")
    assert info.value.exit_code == 3

"""The dashboard's JSON API and /metrics over real HTTP, against a real coordinator fed over real gRPC.

Volunteers register, take work, report signed contributions and heartbeats; a validator passes one audit
and fails another; the figures the API and /metrics show must be the ledger's, read straight from SQLite.
"""

import hashlib
import json
import sqlite3
import time
import urllib.error
import urllib.request

import pytest
import torch
from coordinator_helpers import FakeClock, ServerThread, contribution_for, run_toml
from omi.coordinator.checkpointer import write_checkpoint
from omi.coordinator.store import Checkpoint
from omi.coordinator.views import AuditCounts
from omi.dashboard.api import DEFAULT_TTL, Snapshots
from omi.models import MicroBatchRecord, build_model, merkle_root
from omi.models.data import DIGIT_PROMPTS
from omi.protos import pb, signing
from omi.protos.manifest import (
    CHECKPOINT_MANIFEST_NAME,
    MANIFEST_FORMAT,
    read_checkpoint_manifest,
    sign_checkpoint_manifest,
)
from PIL import Image
from processes import ROOT
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

XSS_NAME = "<img src=x onerror=\"window.__xss=1\">"
SKETCH_SIZE = 1024  # verification.sketch_size by default


def get(base: str, path: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def get_json(base: str, path: str):
    status, body, _ = get(base, path)
    assert status == 200, (path, status, body)
    return json.loads(body)


def fresh(server, path: str):
    """The answer once the snapshot cache has expired (what a viewer sees a second later)."""
    server.clock.advance(DEFAULT_TTL)
    return get_json(server.http, path)


def records_for(work: pb.WorkAssignment, loss: float) -> tuple[pb.Contribution, list[pb.MicroBatchRecord]]:
    """A contribution over the whole micro-batches of ``work``, committed to their records (one shared sketch)."""
    size = work.micro_batch_size
    count = sum(s.end - s.start for s in work.shards) // size
    sketch = [0.25] * SKETCH_SIZE
    records = [MicroBatchRecord(i, size, loss, 1.0, torch.tensor(sketch)) for i in range(count)]
    contribution = contribution_for(work, samples=count * size, mean_loss=loss, micro_batches=count,
                                    commitment=merkle_root(records), gradient_sketch=sketch)
    protos = [pb.MicroBatchRecord(index=r.index, samples=r.samples, loss=r.loss, grad_norm=r.grad_norm, sketch=sketch)
              for r in records]
    return contribution, protos


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def swarm(tmp_path_factory, request):
    """A coordinator with dashboard; two volunteers' contributions, all audited: alice's records match her
    commitment and a validator passes them, mallory hands over one record fewer than she claimed (failed).
    Once on SQLite, once on a real PostgreSQL database."""
    state = tmp_path_factory.mktemp("coordinator")
    db_url = request.getfixturevalue("postgres_server").new_database() if request.param == "postgresql" else None
    with ServerThread(state, run_toml("t", audit_rate=1.0, max_strikes=3), http=True, db_url=db_url,
                      clock=FakeClock()) as server:
        alice, mallory = server.node("t", "alice"), server.node("t", XSS_NAME)
        validator = server.validator("t", "validator")
        for node, loss in ((alice, 0.4), (mallory, 0.6)):
            contribution, records = records_for(node.get_work(round_number=0), loss)
            reply = node.report_contribution(contribution)
            assert reply.audit_task_id, "audit_rate 1.0 audits every contribution"
            handed = records if node is alice else records[:-1]
            assert node.submit_audit_records(reply.audit_task_id, handed).accepted == (node is alice)
            node.heartbeat(round_number=0, samples_per_second=120.0 if node is alice else 80.0, swarm_peers=2,
                           loss=loss)
        with pytest.raises(Exception, match="already reported"):  # a second report of round 0 is refused
            alice.report_contribution(records_for(alice.get_work(round_number=0), 0.4)[0])
        task = validator.get_audit_task()
        assert task.has_task and task.node_id == alice.node_id
        validator.report_audit_verdict(pb.AuditVerdict(task_id=task.task_id, passed=True))
        server.coordinator.record_metrics()
        server.nodes = {"alice": alice, "mallory": mallory, "validator": validator}
        yield server


def ledger(server) -> dict:
    """Per node: (samples not voided, verified samples, contributions not voided), read from the database in SQL."""
    with server.store.engine.connect() as db:
        rows = db.execute(text("SELECT node_id, status, samples FROM contributions WHERE run_id = 't'")).all()
    out = {}
    for node_id, status, samples in rows:
        s, v, n = out.get(node_id, (0, 0, 0))
        out[node_id] = (s + (samples if status != "voided" else 0), v + (samples if status == "verified" else 0),
                        n + (status != "voided"))
    return out


def test_status_matches_the_ledger(swarm):
    status = get_json(swarm.http, "/api/runs/t/status")
    book = ledger(swarm)
    assert status["total_samples"] == sum(s for s, _, _ in book.values()) > 0
    assert status["verified_samples"] == sum(v for _, v, _ in book.values()) > 0
    assert status["contributions"] == sum(n for _, _, n in book.values()) == 1  # mallory's was voided
    assert status["contributions_by_status"] == {"accepted": 0, "verified": 1, "voided": 1}
    assert status["audits"] == {"awaiting_records": 0, "pending": 0, "assigned": 0, "disputed": 0, "passed": 1,
                                "failed": 1}
    assert status["contributions_refused"] == 1
    assert status["volunteers_online"] == 3  # registering counts as a sign of life
    # the ledger's growth over the last minute (both reports are seconds old), not the heartbeats' 120 + 80
    assert status["samples_per_second"] == pytest.approx(sum(s for s, _, _ in book.values()) / 60)
    assert status["loss"] == pytest.approx(0.5)
    assert (status["run_id"], status["model"], status["state"]) == ("t", "unet-digits-16", "running")
    grpc_status = swarm.nodes["alice"].get_run_status("t")
    assert status["total_samples"] == grpc_status.summary.total_samples
    assert status["verified_samples"] == grpc_status.verified_samples
    runs = get_json(swarm.http, "/api/runs")
    assert [r["run_id"] for r in runs] == ["t"] and runs[0]["total_samples"] == status["total_samples"]


def test_contributors_match_the_ledger_and_keep_names_verbatim(swarm):
    rows = {r["node_id"]: r for r in get_json(swarm.http, "/api/runs/t/contributors")}
    nodes = swarm.nodes
    assert set(rows) == {n.node_id for n in nodes.values()}
    for node_id, (samples, verified, count) in ledger(swarm).items():
        assert (rows[node_id]["samples"], rows[node_id]["verified_samples"], rows[node_id]["contributions"]) == (
            samples, verified, count)
    alice, mallory = rows[nodes["alice"].node_id], rows[nodes["mallory"].node_id]
    assert mallory["display_name"] == XSS_NAME  # the API returns data; the page renders it as text
    assert (alice["audits_passed"], alice["audits_failed"]) == (1, 0)
    assert (mallory["audits_passed"], mallory["audits_failed"], mallory["samples"]) == (0, 1, 0)
    assert alice["short_id"] == alice["node_id"][:12] and alice["online"] and not alice["banned"]
    assert abs(alice["last_seen_ms"] - time.time() * 1000) < 120_000
    assert list(rows)[0] == nodes["alice"].node_id  # most samples first


def test_history_and_since(swarm):
    history = get_json(swarm.http, "/api/runs/t/history")
    assert len(history["points"]) >= 1
    point = history["points"][-1]
    assert point["total_samples"] == get_json(swarm.http, "/api/runs/t/status")["total_samples"]
    assert point["volunteers_online"] == 3 and point["loss"] == pytest.approx(0.5)
    later = get_json(swarm.http, f"/api/runs/t/history?since={history['next_since_ms']}")
    assert later["points"] == [] and later["next_since_ms"] == history["next_since_ms"]
    assert get(swarm.http, "/api/runs/t/history?since=-1")[0] == 422


def test_unknown_run_is_404_json(swarm):
    for path in ("status", "history", "contributors", "checkpoints"):
        status, body, headers = get(swarm.http, f"/api/runs/nope/{path}")
        assert status == 404 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"detail": "no run 'nope'"}
    assert get(swarm.http, "/runs/nope")[0] == 404
    assert get(swarm.http, "/runs/t")[0] == 200
    status, body, _ = get(swarm.http, "/api/runs/nope/data-card")
    assert status == 404 and json.loads(body) == {"detail": "no run 'nope'"}
    # a run that trains on a built-in source has no data card: the page hides its Data section
    status, body, _ = get(swarm.http, "/api/runs/t/data-card")
    assert status == 404 and json.loads(body) == {
        "detail": "run 't' has no prepared data set on this coordinator (its data: builtin:digits)"}


def test_api_is_read_only_and_documented(swarm):
    before = swarm.store.row_counts()
    paths = ["/api/runs", "/api/runs/t/status", "/api/runs/t/history?since=0", "/api/runs/t/contributors",
             "/api/runs/t/checkpoints", "/metrics", "/", "/runs/t", "/openapi.json"]
    for path in paths:
        assert get(swarm.http, path)[0] == 200, path
    for path in paths[:5]:
        request = urllib.request.Request(swarm.http + path.split("?")[0], data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 405, path
    assert swarm.store.row_counts() == before
    schema = get_json(swarm.http, "/openapi.json")
    for path in ("/api/runs", "/api/runs/{run}/status", "/api/runs/{run}/history", "/api/runs/{run}/contributors",
                 "/api/runs/{run}/checkpoints", "/api/runs/{run}/data-card", "/metrics"):
        assert set(schema["paths"][path]) == {"get"}, path
    status_schema = schema["paths"]["/api/runs/{run}/status"]["get"]["responses"]
    assert status_schema["200"]["content"]["application/json"]["schema"]["$ref"].endswith("RunStatusView")
    assert "404" in status_schema
    assert {"since", "limit"} <= {p["name"] for p in schema["paths"]["/api/runs/{run}/history"]["get"]["parameters"]}


def test_metrics_parse_and_match_the_api(swarm):
    status = get_json(swarm.http, "/api/runs/t/status")
    _, body, headers = get(swarm.http, "/metrics")
    assert headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    run = (("run", "t"),)
    assert samples[("omi_volunteers_online", run)] == status["volunteers_online"]
    assert samples[("omi_run_samples", run)] == status["total_samples"]
    assert samples[("omi_run_verified_samples", run)] == status["verified_samples"]
    assert samples[("omi_run_samples_per_second", run)] == pytest.approx(status["samples_per_second"])
    assert samples[("omi_run_round", run)] == status["round"]
    assert samples[("omi_run_loss", run)] == pytest.approx(status["loss"])
    assert samples[("omi_contributions_accepted_total", run)] == 2
    assert samples[("omi_contributions_refused_total", (("code", "ALREADY_EXISTS"), ("run", "t")))] == 1
    for state, n in status["audits"].items():
        assert samples[("omi_audits", (("run", "t"), ("state", state)))] == n
    assert samples[("omi_run_state", (("run", "t"), ("state", "running")))] == 1
    assert not any(name == "omi_checkpoint_age_seconds" for name, _ in samples)  # no checkpoint yet


def test_checkpoints_listed_with_links_sha256_and_preview(swarm):
    assert get_json(swarm.http, "/api/runs/t/checkpoints") == []
    folder = swarm.coordinator.checkpoints.folder("t", 1)  # where the checkpointer writes round 1
    folder.mkdir(parents=True)
    files = {"unet/diffusion_pytorch_model.safetensors": b"weights", "preview.png": b"\x89PNG fake"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    key = swarm.coordinator.key
    _, manifest_bytes = sign_checkpoint_manifest(dict(
        format=MANIFEST_FORMAT, run_id="t", model="unet-digits-16", round=1, total_samples=256, loss=None,
        created_at_ms=0, params_hash="0" * 64, contributors=[], data_shards=[], data_source="digits",
        coordinator_public_key=signing.public_bytes(key).hex(),
        files=[{"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
               for name, data in files.items()]), key)
    (folder / CHECKPOINT_MANIFEST_NAME).write_bytes(manifest_bytes)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    created = int(time.time() * 1000) - 30_000
    with swarm.store.transaction() as s:
        s.add(Checkpoint(run_id="t", round=1, total_samples=256, manifest_sha256=manifest_sha, size_bytes=1234,
                         path="/runs/t/checkpoints/1", milestone=False, created_at_ms=created))
    [checkpoint] = fresh(swarm, "/api/runs/t/checkpoints")
    assert checkpoint["manifest_sha256"] == manifest_sha and checkpoint["round"] == 1
    assert checkpoint["manifest_url"] == "/runs/t/checkpoints/1/manifest.json"
    assert checkpoint["preview_url"] == "/runs/t/checkpoints/1/preview.png"
    assert {f["name"]: f["sha256"] for f in checkpoint["files"]} == {
        name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert checkpoint["preview_prompts"] == [] and checkpoint["preview_columns"] is None  # an unconditional run
    assert get_json(swarm.http, "/api/runs/t/status")["latest_checkpoint"]["round"] == 1
    _, body, _ = get(swarm.http, "/metrics")
    ages = [s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
            if s.name == "omi_checkpoint_age_seconds"]
    assert len(ages) == 1 and 29 <= ages[0] < 120


def test_a_text_to_image_run_shows_its_data_card_and_the_prompts_of_its_preview(captioned_digits, tmp_path,
                                                                                 one_torch_thread):
    """The data card is the prepared data set's manifest.json (its DATA_CARD.md served beside it); a checkpoint's
    preview names the prompt of each cell, in the order the grid was drawn and laid out."""
    run_id, data = "digits-captioned", captioned_digits
    spec_toml = (ROOT / "examples/runs/digits-captioned.toml").read_text()
    spec_toml = spec_toml.replace('source = "manifest:data/digits-captioned"', f'source = "manifest:{data}"')
    spec_toml = spec_toml.replace("preview_samples = 16", "preview_samples = 12")  # 10 prompts: row 3 wraps around
    dataset = json.loads((data / "manifest.json").read_text())
    with ServerThread(tmp_path / "state", spec_toml, http=True) as server:
        card = get_json(server.http, f"/api/runs/{run_id}/data-card")
        assert (card["run_id"], card["name"], card["model"], card["resolution"]) == (
            run_id, dataset["name"], "sana-digits", 32)
        assert {k: card[k] for k in dataset["card"]} == dataset["card"]
        assert card["licenses"] == dataset["licenses"] == {"CC-BY-4.0": 1797}
        assert (card["samples"], card["shards"], card["refused"]) == (1797, len(dataset["shards"]), {})
        assert card["parts_sha256"] == dataset["parts"]["sha256"]
        assert card["manifest_sha256"] == hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()
        assert get(server.http, card["manifest_url"])[1] == (data / "manifest.json").read_bytes()
        status, body, headers = get(server.http, card["card_url"])
        assert status == 200 and body == (data / "DATA_CARD.md").read_bytes()
        assert headers["content-type"].startswith("text/plain")  # opens in the browser

        coordinator = server.coordinator
        model, scheduler = build_model("sana-digits")
        folder, manifest = write_checkpoint(model, scheduler, spec=coordinator.runs.spec_for_nodes(run_id),
                                            round_number=1,
                                            run_folder=coordinator.checkpoints.run_folder(run_id),
                                            checkpoints=coordinator.checkpoints, key=coordinator.key)
        coordinator.checkpoints.publish(run_id, 1, folder, manifest)
        [checkpoint] = get_json(server.http, f"/api/runs/{run_id}/checkpoints")
    cells = [DIGIT_PROMPTS[i % 10] for i in range(12)]
    assert manifest.preview_prompts == checkpoint["preview_prompts"] == cells
    assert manifest.preview_columns == checkpoint["preview_columns"] == 4
    on_disk = read_checkpoint_manifest((folder / CHECKPOINT_MANIFEST_NAME).read_bytes(),
                                       signing.public_bytes(coordinator.key))
    assert on_disk == manifest
    # 4 cells of 32 pixels per row, 3 rows, 2 pixels apart, upscaled twice: the grid the prompts describe
    assert Image.open(folder / "preview.png").size == ((4 * 34 + 2) * 2, (3 * 34 + 2) * 2)


def test_a_run_whose_data_is_a_manifest_url_shows_the_data_card_it_fetched(captioned_digits, tmp_path):
    """A ``manifest:URL`` run (a mirror serves the prepared data set): the card is the manifest the coordinator
    fetched and checked against the run's pin when it opened the run; the links point at the mirror."""
    import http.server
    import threading
    from functools import partial

    data, requested = captioned_digits, []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requested.append(self.path)

    mirror = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(data)))
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{mirror.server_address[1]}/"
    raw = (data / "manifest.json").read_bytes()
    pinned = f"{url}#sha256:{hashlib.sha256(raw).hexdigest()}"
    spec_toml = (ROOT / "examples/runs/digits-captioned.toml").read_text()
    try:
        for run_id, source in (("by-url", url), ("pinned", pinned)):
            text = spec_toml.replace('source = "manifest:data/digits-captioned"', f'source = "manifest:{source}"')
            text = text.replace('id = "digits-captioned"', f'id = "{run_id}"')
            with ServerThread(tmp_path / run_id, text, http=True) as server:
                card = get_json(server.http, f"/api/runs/{run_id}/data-card")
                assert card["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
                assert card["manifest_url"] == url + "manifest.json" and card["card_url"] is None
                dataset = json.loads(raw)
                assert {k: card[k] for k in dataset["card"]} == dataset["card"]
                assert card["licenses"] == {"CC-BY-4.0": 1797} and card["samples"] == 1797
    finally:
        mirror.shutdown()
        mirror.server_close()
    # the coordinator read the manifest (and the empty prompt's embedding), never a shard
    assert requested and not [path for path in requested if "shard" in path], requested


def test_snapshots_reuse_an_answer_for_ttl_seconds():
    now = [100.0]
    snapshots = Snapshots(ttl=1.0, clock=lambda: now[0])
    computed = []

    def compute() -> AuditCounts:
        computed.append(now[0])
        return AuditCounts(passed=len(computed), failed=float("nan"))

    view, body = snapshots.get(("k",), compute)
    assert view.passed == 1
    # JSON has no NaN: a non-finite float is null
    assert json.loads(body) == {"awaiting_records": 0, "pending": 0, "assigned": 0, "disputed": 0, "passed": 1,
                                "failed": None}
    now[0] += 0.5
    assert snapshots.get(("k",), compute)[0].passed == 1
    now[0] += 0.6
    assert snapshots.get(("k",), compute)[0].passed == 2
    assert snapshots.get(("other",), compute)[0].passed == 3
    assert computed == [100.0, 101.1, 101.1]


def test_snapshots_stay_within_their_entry_and_byte_bounds():
    # every `since` of /api/runs/{run}/history is a key of its own: fresh answers must not pile up
    snapshots = Snapshots(ttl=60.0, clock=lambda: 100.0, max_entries=8, max_bytes=600)
    for since in range(50):
        snapshots.get(("history", "r", since), lambda since=since: AuditCounts(passed=since))
        assert len(snapshots._entries) <= 8 and snapshots._bytes <= 600
    assert snapshots._bytes == sum(len(body) for _, _, body in snapshots._entries.values())
    assert ("history", "r", 49) in snapshots._entries and ("history", "r", 0) not in snapshots._entries


def test_contributors_show_utilization_and_round_figures(tmp_path):
    from omi.coordinator.views import contributors

    with ServerThread(tmp_path / "state", run_toml("r")) as server:
        carol = server.node("r", "carol")
        reported = []
        for round_number in (0, 1):
            if round_number:  # the two reports must arrive at different milliseconds for a wall time to exist
                time.sleep(0.05)
            contribution = contribution_for(carol.get_work(round_number=round_number), compute_seconds=0.02,
                                            end_params_hash=b"e" * 32, bytes_sent=1000 * (round_number + 1))
            assert carol.report_contribution(contribution).accepted
            reported.append(contribution)
        view = {v.display_name: v for v in contributors(server.coordinator, "r")}["carol"]
        with sqlite3.connect(server.store.engine.url.database) as db:
            first, last = db.execute("SELECT min(received_at_ms), max(received_at_ms) FROM contributions").fetchone()
        # one contribution's compute (the second's) over the wall time between the two reports, as received
        assert view.utilization == pytest.approx(0.02 / ((last - first) / 1000))
        assert view.micro_batches_per_contribution == pytest.approx(sum(c.micro_batches for c in reported) / 2)
        assert view.bytes_per_sample == pytest.approx(3000 / sum(c.samples for c in reported))

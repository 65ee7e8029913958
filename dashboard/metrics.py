"""Prometheus ``/metrics``: the figures of every run, read at scrape time from the same views as the JSON API."""

import logging
from collections.abc import Iterator

from omi.coordinator import views
from omi.coordinator.core import Coordinator
from omi.coordinator.states import AuditState
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class RunCollector(Collector):
    """One sample per run (label ``run``) of each figure the dashboard shows.

    :param coordinator: the running coordinator
    :param status: run id -> its status view (the API's cached one, so a scrape and the API agree)
    """

    def __init__(self, coordinator: Coordinator, status=None):
        self.coordinator = coordinator
        self.status = status or (lambda run: views.run_status(coordinator, run))

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "volunteers_online": GaugeMetricFamily("omi_volunteers_online", "Volunteers heard from within the "
                                                   "heartbeat timeout", labels=["run"]),
            "total_samples": GaugeMetricFamily("omi_run_samples", "Samples trained in the run (voided "
                                               "contributions excluded)", labels=["run"]),
            "verified_samples": GaugeMetricFamily("omi_run_verified_samples", "Samples of contributions that "
                                                  "passed an audit", labels=["run"]),
            "samples_per_second": GaugeMetricFamily("omi_run_samples_per_second", "Swarm throughput: samples the "
                                                    "ledger grew by over the last minute, per second", labels=["run"]),
            "round": GaugeMetricFamily("omi_run_round", "Current round of the run", labels=["run"]),
            "loss": GaugeMetricFamily("omi_run_loss", "Mean latest training loss of the volunteers online",
                                      labels=["run"]),
        }
        state = GaugeMetricFamily("omi_run_state", "1 for the run's current state", labels=["run", "state"])
        accepted = CounterMetricFamily("omi_contributions_accepted", "Contributions the ledger accepted "
                                       "(a later failed audit voids one but does not un-accept it)", labels=["run"])
        refused = CounterMetricFamily("omi_contributions_refused", "Contributions the ledger refused since the "
                                      "coordinator started, by gRPC status code", labels=["run", "code"])
        contributions = GaugeMetricFamily("omi_contributions", "Contributions by status", labels=["run", "status"])
        audits = GaugeMetricFamily("omi_audits", "Audits by state (passed and failed are verdicts)",
                                   labels=["run", "state"])
        age = GaugeMetricFamily("omi_checkpoint_age_seconds", "Seconds since the latest checkpoint was written",
                                labels=["run"])
        checkpoint_round = GaugeMetricFamily("omi_checkpoint_round", "Round of the latest checkpoint", labels=["run"])
        codes = {}
        for (run, code), n in self.coordinator.ledger.refused.items():
            codes.setdefault(run, {})[code] = n
        for run in self.coordinator.runs.run_ids():
            s = self.status(run)
            for attribute, family in gauges.items():
                value = getattr(s, attribute)
                if value is not None:
                    family.add_metric([run], value)
            state.add_metric([run, s.state], 1)
            accepted.add_metric([run], sum(s.contributions_by_status.values()))
            for code, n in sorted(codes.get(run, {}).items()):
                refused.add_metric([run, code], n)
            for status, n in s.contributions_by_status.items():
                contributions.add_metric([run, status], n)
            for audit_state in AuditState:
                audits.add_metric([run, audit_state.value], getattr(s.audits, audit_state.value))
            if s.latest_checkpoint is not None:
                age.add_metric([run], max(0.0, (s.server_time_ms - s.latest_checkpoint.created_at_ms) / 1000))
                checkpoint_round.add_metric([run], s.latest_checkpoint.round)
        yield from gauges.values()
        yield from (state, accepted, refused, contributions, audits, age, checkpoint_round)

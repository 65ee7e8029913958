"""What a volunteer sees while its node trains: a live rich panel, or one JSON object per log line for servers."""

import json
import logging
import math
import time

from omi.node.trainer import NodeStatus
from rich.console import Console
from rich.live import Live
from rich.table import Table

logger = logging.getLogger(__name__)


def status_table(status: NodeStatus) -> Table:
    """The live panel: run, round, local and swarm samples/s, peers, loss, contributions."""
    table = Table(title=f"omi-node · run [bold]{status.run_id or '?'}[/bold] · {status.state}", show_header=False,
                  title_justify="left", min_width=52)
    table.add_column(style="dim")
    table.add_column(justify="right")
    loss = "—" if math.isnan(status.loss) else f"{status.loss:.4f}"
    rows = [
        ("node", status.node_id[:12] or "?"),
        ("round", str(status.round)),
        ("local samples/s", f"{status.local_samples_per_second:,.0f}"),
        ("swarm samples/s", f"{status.swarm_samples_per_second:,.0f}"),
        ("peers in the run", str(status.peers)),
        ("last averaging group", str(status.last_group_size or "—")),
        ("loss", loss),
        ("samples trained", f"{status.samples:,}"),
        ("contributions accepted", str(status.contributions)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


class LiveView:
    """A rich Live panel refreshed from the node's status (at most 4 times a second).

    >>> with LiveView(Console()) as view:  # doctest: +SKIP
    ...     node = VolunteerNode(config, on_status=view.update)
    """

    def __init__(self, console: Console):
        self.live = Live(status_table(NodeStatus()), console=console, refresh_per_second=4, transient=False)
        self._last = 0.0

    def update(self, status: NodeStatus) -> None:
        now = time.monotonic()
        if now - self._last >= 0.25 or status.state != "training":
            self._last = now
            self.live.update(status_table(status))

    def __enter__(self) -> "LiveView":
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)


class JsonFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message (``--log-json``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)

"""The status page's HTML (issue 21): what one rendering shows (:class:`Snapshot`,
made by :func:`mta.daemon.status.snapshot`) rendered on the server, no
JavaScript; the throughput charts are inline SVG.

Every value that came from mail or from a peer (addresses, replies, host names,
queue ids, TLS descriptions) goes through :func:`esc` (``html.escape`` with
quotes), in text and in attributes alike.  Sections have stable ids
(``queue-destinations``, ``queue-reasons``, ``oldest``, ``held``, ``deliveries``,
``failures``, ``tls``, ``throughput``) for tests and for whoever scrapes it.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any

from mta.queue.envelope import Envelope
from mta.queue.shape import Row, bucket_labels, destinations

SERIES = ("received", "delivered", "deferred", "bounced")  # the throughput charts


@dataclass(frozen=True)
class Note:
    """One delivery result as the page lists it."""

    time: float
    queue_id: str
    recipient: str
    destination: str
    outcome: str  # delivered, failed, expired
    reply: str
    remote_mta: str = ""
    tls: str = ""


@dataclass
class TLSCount:
    """Delivered recipients of one destination by how the connection was protected."""

    verified: int = 0
    encrypted: int = 0  # TLS without a verified certificate
    clear: int = 0
    last: str = ""  # the last TLS version and cipher ("" for none)


@dataclass
class Snapshot:
    """Everything on one rendering of the page."""

    hostname: str
    now: float
    queued: int  # messages in the queue
    scanned: int  # envelopes read for the tables
    unreadable: int
    by_destination: list[Row]
    by_reason: list[Row]
    oldest: Envelope | None
    deliveries: list[Note]
    failures: list[Note]
    tls: list[tuple[str, TLSCount]]
    throughput: list[tuple[float, list[int]]]
    notes: list[str] = field(default_factory=list)
    held: list[Envelope] = field(default_factory=list)  # the hold queue (issue 17), oldest first
    held_total: int = 0  # messages held (held lists at most status.MAX_HELD)


CHART_W, CHART_H = 360, 100  # the plot area of a chart, in SVG user units
COLOURS = {"received": "#1f77b4", "delivered": "#2ca02c", "deferred": "#ff7f0e",
           "bounced": "#d62728"}
STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:bold}
.reply{font-family:monospace;white-space:pre-wrap;word-break:break-word;max-width:50em}
.note{color:#a50}
figure{display:inline-block;margin:.5em 1em .5em 0}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes}m"
    hours = minutes // 60
    return f"{hours}h {minutes % 60}m" if hours < 48 else f"{hours // 24}d {hours % 24}h"


def _shape_table(section: str, title: str, first: str, rows: list[Any]) -> str:
    head = "".join(f"<th>{esc(b)}</th>" for b in bucket_labels())
    body = []
    for name, total, counts in rows:
        cls = ' class="total"' if name == "TOTAL" else ""
        cells = "".join(f'<td class="n">{n}</td>' for n in counts)
        body.append(f'<tr{cls} data-row="{esc(name)}"><td>{esc(name)}</td>'
                    f'<td class="n">{total}</td>{cells}</tr>')
    return (f'<section id="{section}"><h2>{esc(title)}</h2>'
            f"<table><thead><tr><th>{esc(first)}</th><th>total</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
            f"<p>Columns: age in minutes, at most (as Postfix's qshape).</p></section>")


def _oldest(snap: Snapshot) -> str:
    env = snap.oldest
    if env is None:
        return '<section id="oldest"><h2>Oldest message</h2><p>The queue is empty.</p></section>'
    pending = [r for r in env.recipients if not r.state.final]
    rows = "".join(
        f"<tr><td>{esc(r.original or r.address)}</td><td>{esc(r.state)}</td>"
        f'<td class="n">{r.attempts}</td><td class="reply">{esc(r.last_reply)}</td></tr>'
        for r in pending[:20])
    more = f"<p>and {len(pending) - 20} more recipients</p>" if len(pending) > 20 else ""
    return (f'<section id="oldest"><h2>Oldest message</h2>'
            f"<p>Queue id <code>{esc(env.id)}</code>, from &lt;{esc(env.sender)}&gt;, "
            f"queued {esc(when(env.created))} ({esc(age(snap.now - env.created))} ago), "
            f"{env.size} octets, to {esc(', '.join(destinations(env)))}.</p>"
            f"<table><thead><tr><th>recipient</th><th>state</th><th>attempts</th>"
            f"<th>last reply</th></tr></thead><tbody>{rows}</tbody></table>{more}</section>")


def _held(snap: Snapshot) -> str:
    title = "Held messages (the hold queue: released by mta queue release ID)"
    if not snap.held:
        return f'<section id="held"><h2>{esc(title)}</h2><p>No message is held.</p></section>'
    rows = []
    for env in snap.held:
        pending = [r.original or r.address for r in env.recipients if not r.state.final]
        shown = ", ".join(pending[:5]) + (f" and {len(pending) - 5} more" if len(pending) > 5
                                          else "")
        rows.append(f'<tr data-row="{esc(env.id)}"><td><code>{esc(env.id)}</code></td>'
                    f"<td>{esc(env.sender or '<>')}</td><td>{esc(shown)}</td>"
                    f'<td class="reply">{esc(env.hold)}</td>'
                    f'<td class="n">{esc(age(snap.now - env.created))}</td></tr>')
    more = (f"<p>and {snap.held_total - len(snap.held)} more held messages</p>"
            if snap.held_total > len(snap.held) else "")
    return (f'<section id="held"><h2>{esc(title)}</h2><p>{snap.held_total} held.</p>'
            f"<table><thead><tr><th>queue id</th><th>sender</th><th>recipients</th>"
            f"<th>held because</th><th>age</th></tr></thead><tbody>{''.join(rows)}</tbody>"
            f"</table>{more}</section>")


def _notes_table(section: str, title: str, notes: list[Note], empty: str) -> str:
    if not notes:
        return f'<section id="{section}"><h2>{esc(title)}</h2><p>{esc(empty)}</p></section>'
    rows = "".join(
        f'<tr data-outcome="{esc(n.outcome)}"><td>{esc(when(n.time))}</td>'
        f"<td><code>{esc(n.queue_id)}</code></td><td>{esc(n.recipient)}</td>"
        f"<td>{esc(n.destination)}</td><td>{esc(n.outcome)}</td>"
        f"<td>{esc(n.remote_mta)}</td><td>{esc(n.tls or 'none')}</td>"
        f'<td class="reply">{esc(n.reply)}</td></tr>' for n in notes)
    return (f'<section id="{section}"><h2>{esc(title)}</h2><table><thead><tr><th>time</th>'
            f"<th>queue id</th><th>recipient</th><th>via</th><th>outcome</th><th>server</th>"
            f"<th>TLS</th><th>reply</th></tr></thead><tbody>{rows}</tbody></table></section>")


def _tls(snap: Snapshot) -> str:
    title = "TLS per destination (delivered recipients since start)"
    if not snap.tls:
        return f'<section id="tls"><h2>{title}</h2><p>No remote delivery yet.</p></section>'
    rows = "".join(
        f'<tr data-row="{esc(d)}"><td>{esc(d)}</td><td class="n">{c.verified}</td>'
        f'<td class="n">{c.encrypted}</td><td class="n">{c.clear}</td>'
        f"<td>{esc(c.last or 'none')}</td></tr>" for d, c in snap.tls)
    return (f'<section id="tls"><h2>{title}</h2><table><thead><tr><th>destination</th>'
            f"<th>TLS, verified</th><th>TLS, not verified</th><th>clear</th>"
            f"<th>last TLS</th></tr></thead><tbody>{rows}</tbody></table></section>")


def chart(name: str, points: list[int], start: float) -> str:
    """One series of per-minute counts as an inline SVG line chart with its axes."""
    top = max(max(points, default=0), 1)
    step = CHART_W / max(len(points) - 1, 1)
    coords = " ".join(f"{40 + i * step:.1f},{10 + CHART_H - n * CHART_H / top:.1f}"
                      for i, n in enumerate(points))
    colour = COLOURS.get(name, "#444")
    total = sum(points)
    label = f"{name}: {total} in the last hour, at most {max(points, default=0)} a minute"
    return (f'<figure data-series="{esc(name)}" data-total="{total}">'
            f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{CHART_W + 60}" '
            f'height="{CHART_H + 40}" viewBox="0 0 {CHART_W + 60} {CHART_H + 40}" '
            f'aria-label="{esc(label)}"><title>{esc(label)}</title>'
            f'<rect x="40" y="10" width="{CHART_W}" height="{CHART_H}" fill="#fafafa" '
            f'stroke="#ccc"/>'
            f'<text x="35" y="18" font-size="11" text-anchor="end">{top}</text>'
            f'<text x="35" y="{CHART_H + 10}" font-size="11" text-anchor="end">0</text>'
            f'<text x="40" y="{CHART_H + 28}" font-size="11">{esc(when(start)[11:16])}</text>'
            f'<text x="{CHART_W + 40}" y="{CHART_H + 28}" font-size="11" '
            f'text-anchor="end">now</text>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
            f"</svg><figcaption>{esc(label)}</figcaption></figure>")


def _throughput(snap: Snapshot) -> str:
    start = snap.throughput[0][0] if snap.throughput else snap.now
    charts = "".join(chart(name, [counts[i] for _, counts in snap.throughput], start)
                     for i, name in enumerate(SERIES))
    return (f'<section id="throughput"><h2>Throughput, last hour (per minute; recipients, '
            f"received: messages)</h2>{charts}</section>")


def render(snap: Snapshot) -> str:
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in snap.notes)
    if snap.unreadable:
        notes += f'<p class="note">{snap.unreadable} envelopes could not be read.</p>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="30">'
        f"<title>{esc(snap.hostname)}: mail status</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(snap.hostname)}: mail status</h1>"
        f'<p id="summary">{snap.queued} messages queued; page made {esc(when(snap.now))} '
        "(refreshes every 30 s).</p>"
        f"{notes}"
        + _shape_table("queue-destinations", "Queue by destination and age", "destination",
                       snap.by_destination)
        + _shape_table("queue-reasons", "Queue by deferral reason and age", "reason",
                       snap.by_reason)
        + _oldest(snap)
        + _held(snap)
        + _notes_table("deliveries", "Recent deliveries", snap.deliveries,
                       "No delivery since start.")
        + _notes_table("failures", "Recent failures (bounced or expired)", snap.failures,
                       "No failure since start.")
        + _tls(snap)
        + _throughput(snap)
        + "</body></html>\n")

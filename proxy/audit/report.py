"""``pgwarden audit report``: one self-contained HTML page for security review (R5.3).

``summarise`` turns events into numbers (no I/O); ``render_html`` draws them
as a page with inline CSS and SVG charts drawn here, no scripts, fonts or
CDN, so it opens on an air-gapped reviewer's laptop.

Sections and the event fields they are keyed on:

* per-user activity: statement events by ``user`` (rows, refusals, receipts);
* refusals (``outcome: refused``, with ``reason``), failed logins and lockouts (``event: lockout``);
* masked-column accesses: ``masked`` of statement events;
* off-shift access: a person whose configuration gives a ``shift`` attribute
  is off shift outside that shift of the rules; anyone else, in the
  off-hours window (default 23:00-07:00, the hotel's night shift), in the
  rules' time zone;
* most-looked-up guests: ``audit_search.guests_of`` (subject keys from the rules);
* emergency access: break-glass uses (``emergency_started``, and statements
  whose ``emergency`` names the use, ``E-N``) and the overdue ones: started
  more than 24 hours before the end of the period with no ``ticket_requested``
  event backing them (``backs_emergency: E-N``);
* general-manager accesses: role ``general_manager`` or flag ``internal_audit``.

A section with nothing to show says "none recorded".
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, timezone, tzinfo
from typing import Any

from proxy.audit.search import SubjectKeys, decision_of, event_time, guests_of

EMERGENCY_GRACE = timedelta(hours=24)  # R4.5: break-glass must be backed by a ticket within 24 hours


@dataclass(frozen=True)
class Window:
    """A daily time window, local time; may cross midnight."""

    start: time
    end: time

    def contains(self, t: time) -> bool:
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass
class Emergency:
    """One break-glass use: who, when it started (first seen), what was run under it."""

    id: str
    user: str
    role: str
    started: datetime
    reason: str = ""
    statements: int = 0
    rows: int = 0


@dataclass
class UserRow:
    user: str
    role: str = ""
    statements: int = 0
    rows: int = 0
    refused: int = 0
    receipts: int = 0
    off_shift: int = 0


@dataclass
class Summary:
    since: datetime
    until: datetime
    timezone: str
    tz: tzinfo = timezone.utc
    events: int = 0
    statements: int = 0
    users: dict[str, UserRow] = field(default_factory=dict)
    per_day: dict[str, int] = field(default_factory=dict)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    refusal_reasons: Counter[str] = field(default_factory=Counter)
    lockouts: list[dict[str, Any]] = field(default_factory=list)
    login_failures: Counter[str] = field(default_factory=Counter)
    masked: Counter[str] = field(default_factory=Counter)
    masked_by_user: Counter[tuple[str, str]] = field(default_factory=Counter)
    off_shift: list[dict[str, Any]] = field(default_factory=list)
    off_shift_rule: str = ""
    guests: Counter[str] = field(default_factory=Counter)
    guest_users: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    emergencies: dict[str, Emergency] = field(default_factory=dict)
    backed: set[str] = field(default_factory=set)  # break-glass uses a ticket request names
    general_manager: list[dict[str, Any]] = field(default_factory=list)


def summarise(events: Iterable[Mapping[str, Any]], *, since: datetime, until: datetime, tz: tzinfo = timezone.utc,
              tz_name: str = "UTC", keys: SubjectKeys = {}, shifts: Mapping[str, Window] = {},  # noqa: B006
              user_shifts: Mapping[str, str] = {}, off_hours: Window = Window(time(23), time(7))) -> Summary:  # noqa: B006,B008
    """Count what the report shows for events with ``since <= time < until``."""
    s = Summary(since=since, until=until, timezone=tz_name, tz=tz)
    s.off_shift_rule = (f"people with a shift: outside it ({', '.join(f'{k} {v}' for k, v in shifts.items())}); "
                        f"everyone else: {off_hours}, {tz_name}")
    for ev in events:
        t = event_time(ev)
        if t is None or t < since or t >= until:
            continue
        s.events += 1
        kind = ev.get("event")
        if kind == "lockout":
            s.lockouts.append(dict(ev))
        elif kind == "login_failed":
            s.login_failures[f"{ev.get('user') or '?'} from {ev.get('client_addr') or '?'}"] += 1
        use = ev.get("ticket") if kind == "emergency_started" else ev.get("emergency")
        if isinstance(use, str) and use:
            em = s.emergencies.get(use)
            if em is None:
                em = s.emergencies[use] = Emergency(use, str(ev.get("user") or "?"), str(ev.get("role") or ""), t)
            if kind == "emergency_started":
                em.started, em.reason = min(em.started, t), str(ev.get("reason") or em.reason)
            elif kind == "statement":
                em.statements += 1
                em.rows += ev["rows"] if isinstance(ev.get("rows"), int) else 0
        if kind == "ticket_requested" and isinstance(ev.get("backs_emergency"), str):
            s.backed.add(ev["backs_emergency"])
        if kind != "statement":
            continue
        s.statements += 1
        user = str(ev.get("user") or "?")
        row = s.users.get(user)
        if row is None:
            row = s.users[user] = UserRow(user, str(ev.get("role") or ""))
        row.statements += 1
        rows = ev.get("rows")
        row.rows += rows if isinstance(rows, int) else 0
        local = t.astimezone(tz)
        day = local.date().isoformat()
        s.per_day[day] = s.per_day.get(day, 0) + 1
        if decision_of(ev) == "refuse":
            row.refused += 1
            s.refusals.append(dict(ev))
            s.refusal_reasons[str(ev.get("reason") or ev.get("error") or "")] += 1
        if ev.get("receipt"):
            row.receipts += 1
        for col in ev.get("masked") or ():
            s.masked[str(col)] += 1
            s.masked_by_user[(user, str(col))] += 1
        window = shifts.get(user_shifts.get(user, ""))
        off = not window.contains(local.time()) if window is not None else off_hours.contains(local.time())
        if off:
            row.off_shift += 1
            s.off_shift.append(dict(ev))
        for g in guests_of(ev, keys):
            s.guests[g] += 1
            s.guest_users[g].add(user)
        if ev.get("role") == "general_manager" or "internal_audit" in (ev.get("flags") or ()):
            s.general_manager.append(dict(ev))
    return s


def overdue(s: Summary) -> list[Emergency]:
    """Break-glass uses with no ticket requested for them within EMERGENCY_GRACE (R4.5)."""
    return [e for e in s.emergencies.values() if e.id not in s.backed and e.started < s.until - EMERGENCY_GRACE]


# --- drawing ------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:2px solid #345;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#eef} td.n{text-align:right;font-variant-numeric:tabular-nums} .none{color:#777;font-style:italic}
.kpi{display:inline-block;margin:0 2em .5em 0} .kpi b{display:block;font-size:1.7em} code{font-size:12px}
.ok{color:#1d6b2f} .bad{color:#a12a1a;font-weight:600} pre{font-size:12px;white-space:pre-wrap}
svg text{font:12px sans-serif} .muted{color:#666}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def bar_chart(items: list[tuple[str, int]], *, css_id: str, width: int = 640, bar: int = 18,
              color: str = "#3a6ea5") -> str:
    """Horizontal bars with labels and values, as inline SVG."""
    if not items:
        return ""
    label_w, gap = 210, 4
    top = max(v for _, v in items) or 1
    h = len(items) * (bar + gap) + gap
    out = [f'<svg id="{css_id}" class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
           f'viewBox="0 0 {width} {h}" role="img">']
    for i, (label, v) in enumerate(items):
        y = gap + i * (bar + gap)
        w = round((width - label_w - 60) * v / top)
        out.append(f'<text x="{label_w - 6}" y="{y + bar - 5}" text-anchor="end">{_e(label[:32])}</text>'
                   f'<rect class="bar" x="{label_w}" y="{y}" width="{w}" height="{bar}" fill="{color}">'
                   f'<title>{_e(label)}: {v}</title></rect>'
                   f'<text x="{label_w + w + 4}" y="{y + bar - 5}">{v}</text>')
    out.append("</svg>")
    return "".join(out)


def column_chart(items: list[tuple[str, int]], *, css_id: str, width: int = 900, height: int = 180) -> str:
    """Vertical columns (activity per day), as inline SVG."""
    if not items:
        return ""
    top = max(v for _, v in items) or 1
    base, left = height - 24, 36
    step = (width - left - 8) / len(items)
    out = [f'<svg id="{css_id}" class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img">',
           f'<line x1="{left}" y1="{base}" x2="{width - 4}" y2="{base}" stroke="#999"/>',
           f'<text x="{left - 4}" y="14" text-anchor="end">{top}</text>']
    for i, (label, v) in enumerate(items):
        h = round((base - 10) * v / top)
        x = left + i * step
        out.append(f'<rect class="bar" x="{x + 1:.1f}" y="{base - h}" width="{max(step - 2, 1):.1f}" height="{h}" '
                   f'fill="#5b8c5a"><title>{_e(label)}: {v}</title></rect>')
        if i % max(1, len(items) // 10) == 0:
            out.append(f'<text x="{x:.1f}" y="{height - 6}">{_e(label[5:])}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = set(), css_id: str = "") -> str:  # noqa: B006
    if not rows:
        return '<p class="none">none recorded</p>'
    ident = f' id="{css_id}"' if css_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


EVENT_COLUMNS = ["local time", "user", "role", "statement", "rows", "receipt", "ticket"]


def _event_rows(evs: list[dict[str, Any]], tz: tzinfo, limit: int = 200) -> list[list[Any]]:
    rows = []
    for e in evs[:limit]:
        t = event_time(e)
        rows.append([t.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if t else "", e.get("user", ""),
                     e.get("role", ""), e.get("statement", e.get("reason", "")), e.get("rows", ""),
                     e.get("receipt", ""), e.get("ticket", "")])
    return rows


EMERGENCY_COLUMNS = ["use", "started (local time)", "user", "role", "reason", "statements", "rows", "ticket"]


def _emergency_rows(uses: list[Emergency], s: Summary) -> list[list[Any]]:
    return [[e.id, e.started.astimezone(s.tz).strftime("%Y-%m-%d %H:%M:%S"), e.user, e.role, e.reason, e.statements,
             e.rows, "requested" if e.id in s.backed else "none"] for e in sorted(uses, key=lambda e: e.started)]


def _verification_section(v: tuple[str, str, list[str]] | None) -> str:
    """The chain's verdict first: everything below is only as trustworthy as the log it was read from."""
    if v is None:
        return ('<section id="verification"><h2>Chain verification</h2><p class="bad" id="verdict">'
                "the chain was not verified for this report</p></section>")
    status, line, details = v
    cls = "ok" if status == "verified" else "bad"
    pre = "".join(f"{_e(x)}\n" for x in details)
    return (f'<section id="verification"><h2>Chain verification</h2><p class="{cls}" id="verdict" '
            f'data-status="{_e(status)}"><b>{_e(status)}</b>: {_e(line)}</p>'
            + (f'<pre id="verify-details">{pre}</pre>' if pre else "") + "</section>")


def render_html(s: Summary, *, title: str = "pgwarden audit report",
                verification: tuple[str, str, list[str]] | None = None) -> str:
    users = sorted(s.users.values(), key=lambda r: (-r.statements, r.user))
    refused = sum(r.refused for r in users)
    receipts = sum(r.receipts for r in users)
    days = sorted(s.per_day.items())
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1><p class=\"muted\">{s.since:%Y-%m-%d %H:%M} to {s.until:%Y-%m-%d %H:%M} UTC; "
        f"local times in {_e(s.timezone)}</p>",
        '<div id="totals">'
        f'<span class="kpi" id="kpi-statements"><b>{s.statements}</b>statements</span>'
        f'<span class="kpi" id="kpi-users"><b>{len(users)}</b>people</span>'
        f'<span class="kpi" id="kpi-refused"><b>{refused}</b>refused</span>'
        f'<span class="kpi" id="kpi-receipts"><b>{receipts}</b>receipts</span>'
        f'<span class="kpi" id="kpi-offshift"><b>{len(s.off_shift)}</b>off shift</span></div>',
        _verification_section(verification),
        '<section id="activity"><h2>Activity per day</h2>',
        column_chart(days, css_id="chart-days") or '<p class="none">none recorded</p>', "</section>",
        '<section id="per-user"><h2>Per-user activity</h2>',
        bar_chart([(r.user, r.statements) for r in users[:25]], css_id="chart-users"),
        _table(["user", "role", "statements", "rows", "refused", "receipts", "off shift"],
               [[r.user, r.role, r.statements, r.rows, r.refused, r.receipts, r.off_shift] for r in users],
               {2, 3, 4, 5, 6}, "users"), "</section>",
        '<section id="refusals"><h2>Refusals and lockouts</h2>',
        bar_chart([(r.user, r.refused) for r in sorted(users, key=lambda r: -r.refused) if r.refused],
                  css_id="chart-refusals", color="#b5473a"),
        _table(["reason", "refusals"], [[k, v] for k, v in s.refusal_reasons.most_common(20)], {1}, "refusal-reasons"),
        "<h3>Failed logins</h3>",
        _table(["user and address", "failed logins"], [[k, v] for k, v in s.login_failures.most_common(30)], {1},
               "login-failures"),
        "<h3>Lockouts</h3>",
        _table(EVENT_COLUMNS, _event_rows(s.lockouts, s.tz),
               css_id="lockouts"), "</section>",
        '<section id="masked"><h2>Masked-column accesses</h2>',
        bar_chart([(c.removeprefix("public."), n) for c, n in s.masked.most_common(15)], css_id="chart-masked",
                  color="#8a6d3b"),
        _table(["user", "column", "statements"], [[u, c, n] for (u, c), n in s.masked_by_user.most_common(50)],
               {2}, "masked-by-user"), "</section>",
        f'<section id="off-shift"><h2>Off-shift access</h2><p class="muted">{_e(s.off_shift_rule)}</p>',
        _table(EVENT_COLUMNS, _event_rows(s.off_shift, s.tz),
               css_id="off-shift-events"), "</section>",
        '<section id="guests"><h2>Most-looked-up guests</h2>',
        bar_chart([(f"guest {g}", n) for g, n in s.guests.most_common(15)], css_id="chart-guests", color="#6a4c93"),
        _table(["guest", "lookups", "people"],
               [[g, n, ", ".join(sorted(s.guest_users[g]))] for g, n in s.guests.most_common(30)], {1}, "top-guests"),
        "</section>",
        '<section id="emergency"><h2>Emergency access and overdue tickets</h2><h3>Emergency access</h3>',
        _table(EMERGENCY_COLUMNS, _emergency_rows(list(s.emergencies.values()), s), {5, 6}, "emergency-uses"),
        "<h3>Overdue: no ticket within 24 hours</h3>",
        _table(EMERGENCY_COLUMNS, _emergency_rows(overdue(s), s), {5, 6}, "overdue"), "</section>",
        '<section id="general-manager"><h2>General-manager accesses (internal audit)</h2>',
        f'<p class="muted">{len(s.general_manager)} statements flagged for internal-audit filing.</p>',
        _table(EVENT_COLUMNS, _event_rows(s.general_manager, s.tz, 500),
               css_id="gm-events"), "</section>",
        "</body></html>",
    ]
    return "\n".join(parts)

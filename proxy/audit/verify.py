"""``pgwarden audit verify``: find the first broken, missing or reordered event of each replica.

The core (``verify``) takes lines already read, in file order, and does no I/O.
Each replica's events are walked in the order the files put them: each must
hash to its ``hash``, carry the previous event's hash as ``prev_hash`` and
the next ``seq``. What a break means:

* an event whose content does not match its hash was **edited**; an event
  whose hash was recomputed after an edit shows as the next event's
  ``prev_hash`` not matching (reported at the edited event);
* a ``seq`` that jumps ahead with the skipped events nowhere later is
  **missing** (deleted); skipped events found later are **reordered**;
* a line that is not a complete event is **broken**, unless the writer
  itself declared it torn with a ``chain_restart`` event right after it.

Tail deletion cannot be seen from the chain alone: each replica's last
``seq`` and ``hash`` are printed, and a chain that does not end with
``audit_closed`` (a clean stop) is pointed out, so they can be compared
with a copy kept elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.audit.chain import GENESIS, exact, hash_of, parse_line

Line = tuple[str, int, bytes]  # file, line number (1-based), raw line


@dataclass(frozen=True)
class Problem:
    replica: str
    kind: str  # edited | missing | reordered | broken
    where: str  # file:line
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.detail}"


@dataclass
class Chain:
    """What verify learnt about one replica's chain."""

    replica: str
    events: int = 0
    first_seq: int = 0
    last_seq: int = 0
    last_hash: str = ""
    last_event: str = ""
    last_where: str = ""
    notes: list[str] = field(default_factory=list)
    problem: Problem | None = None


@dataclass
class Result:
    chains: dict[str, Chain]
    broken: list[Problem]  # lines that belong to no replica

    @property
    def ok(self) -> bool:
        return not self.broken and all(c.problem is None for c in self.chains.values())


def _replica_of_fragment(raw: bytes) -> str | None:
    """The replica named by a line that is JSON but not a complete chained event."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    rep = obj.get("replica") if isinstance(obj, dict) else None
    return rep if isinstance(rep, str) else None


class _Walker:
    """One replica's chain, walked one event at a time (memory: the previous event only)."""

    def __init__(self, replica: str, from_start: bool) -> None:
        self.chain = Chain(replica)
        self.from_start = from_start
        self.prev: tuple[int, str, str] | None = None  # seq, hash, where
        # A seq jump seen at ``where``: missing, unless seq ``want`` turns up later (then reordered).
        self.gap: tuple[int, int, str, str] | None = None  # want, seq found, where found, prev where

    def add(self, ev: dict[str, Any], where: str) -> None:
        c = self.chain
        if self.gap is not None:
            want, got, at, before = self.gap
            if ev["seq"] == want:
                self.gap = None
                c.problem = Problem(c.replica, "reordered", at, f"seq {got} comes after seq {want - 1} ({before}); "
                                                                f"seq {want} is at {where}")
            return
        if c.problem is not None:
            return
        if hash_of(ev) != ev["hash"]:
            c.problem = Problem(c.replica, "edited", where,
                                f"event seq {ev['seq']} does not match its hash (its content was changed)")
            return
        if self.prev is None:
            c.first_seq = ev["seq"]
            if ev["seq"] != 1 or ev["prev_hash"] != GENESIS:
                msg = f"the chain begins at seq {ev['seq']} ({where}): earlier events are not in the files given"
                if self.from_start:
                    c.problem = Problem(c.replica, "missing", where, msg)
                    return
                c.notes.append(msg)
        else:
            seq, digest, before = self.prev
            want = seq + 1
            if ev["seq"] == want and ev["prev_hash"] == digest:
                pass
            elif ev.get("event") == "chain_restart" and ev["seq"] == 1 and ev["prev_hash"] == GENESIS:
                c.notes.append(f"a new chain segment starts at {where}: {ev.get('reason', '')}")
            elif ev["seq"] == want:
                c.problem = Problem(c.replica, "edited", before,
                                    f"event seq {seq} was changed or replaced: the next event ({where}) "
                                    "was chained to a different hash")
                return
            elif ev["seq"] <= seq:
                c.problem = Problem(c.replica, "reordered", where,
                                    f"seq {ev['seq']} comes after seq {seq} ({before})")
                return
            else:
                self.gap = (want, ev["seq"], where, before)
                return
        c.events += 1
        c.last_seq, c.last_hash = ev["seq"], ev["hash"]
        c.last_event, c.last_where = str(ev.get("event", "")), where
        self.prev = (ev["seq"], ev["hash"], where)

    def end(self) -> Chain:
        if self.gap is not None:
            want, got, at, before = self.gap
            gone = f"seq {want}" if got == want + 1 else f"seq {want}..{got - 1}"
            self.chain.problem = Problem(self.chain.replica, "missing", at,
                                         f"{gone} missing between {before} and {at}")
        return self.chain


def verify(lines: Iterable[Line], *, from_start: bool = False) -> Result:
    """Walk every replica's chain through ``lines`` (given in file order), streaming."""
    walkers: dict[str, _Walker] = {}
    broken: list[Problem] = []
    torn: tuple[str, str, str | None] | None = None  # (file, where, replica) of a line not yet excused
    for file, no, raw in lines:
        if not raw.strip():
            continue
        where = f"{file}:{no}"
        ev = parse_line(raw)
        if ev is None:
            if torn is not None:
                broken.append(_unexcused(torn))
            torn = (file, where, _replica_of_fragment(raw))
            continue
        if torn is not None:
            if not (ev.get("event") == "chain_restart" and torn[0] == file):
                broken.append(_unexcused(torn))
            torn = None
        w = walkers.get(ev["replica"])
        if w is None:
            w = walkers[ev["replica"]] = _Walker(ev["replica"], from_start)
        if w.chain.problem is None and w.gap is None and hash_of(ev) == ev["hash"] and not exact(raw, ev):
            # Same meaning, other bytes (a duplicate key, an escaped character): grep and the ticket
            # summaries read the bytes, so the bytes must be exactly what pgwarden wrote.
            w.chain.problem = Problem(ev["replica"], "edited", where,
                                      f"event seq {ev['seq']} is not byte for byte as written")
            continue
        w.add(ev, where)
    if torn is not None:
        broken.append(_unexcused(torn))
    chains = {rep: w.end() for rep, w in walkers.items()}
    for p in broken:
        if p.replica in chains and chains[p.replica].problem is None:
            chains[p.replica].problem = p
    return Result(chains=chains, broken=[p for p in broken if p.replica not in chains])


def _unexcused(torn: tuple[str, str, str | None]) -> Problem:
    _file, where, replica = torn
    return Problem(replica or "?", "broken", where, "the line is not a complete audit event")


def render(result: Result) -> list[str]:
    """Human-readable lines: one verdict per replica, then notes."""
    out: list[str] = []
    for p in result.broken:
        out.append(f"FAILED (replica unknown) {p}")
    for rep in sorted(result.chains):
        c = result.chains[rep]
        if c.problem is not None:
            out.append(f"replica {rep}: FAILED at {c.problem}")
            continue
        end = "ends with a clean stop (audit_closed)" if c.last_event == "audit_closed" else (
            f"ends at {c.last_where} without a clean stop (still running, or its tail is gone)")
        out.append(f"replica {rep}: intact, {c.events} events, seq {c.first_seq}..{c.last_seq}, "
                   f"last hash {c.last_hash}; {end}")
    for rep in sorted(result.chains):
        for n in result.chains[rep].notes:
            out.append(f"  note ({rep}): {n}")
    return out

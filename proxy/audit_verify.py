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

from .audit_chain import GENESIS, hash_of, parse_line

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


@dataclass
class _Entry:
    where: str
    ev: dict[str, Any]


def _replica_of_fragment(raw: bytes) -> str | None:
    """The replica named by a line that is JSON but not a complete chained event."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    rep = obj.get("replica") if isinstance(obj, dict) else None
    return rep if isinstance(rep, str) else None


def verify(lines: Iterable[Line], *, from_start: bool = False) -> Result:
    """Walk every replica's chain through ``lines`` (given in file order)."""
    by_replica: dict[str, list[_Entry]] = {}
    broken: list[Problem] = []
    pending_torn: tuple[str, str, str | None] | None = None  # (file, where, replica) of a line not yet excused
    for file, no, raw in lines:
        if not raw.strip():
            continue
        where = f"{file}:{no}"
        ev = parse_line(raw)
        if ev is None:
            if pending_torn is not None:
                _unexcused(pending_torn, broken, by_replica)
            pending_torn = (file, where, _replica_of_fragment(raw))
            continue
        if pending_torn is not None:
            if not (ev.get("event") == "chain_restart" and pending_torn[0] == file):
                _unexcused(pending_torn, broken, by_replica)
            pending_torn = None
        by_replica.setdefault(ev["replica"], []).append(_Entry(where, ev))
    if pending_torn is not None:
        _unexcused(pending_torn, broken, by_replica)
    chains = {rep: _walk(rep, entries, from_start) for rep, entries in by_replica.items()}
    for p in broken:
        if p.replica in chains and chains[p.replica].problem is None:
            chains[p.replica].problem = p
    return Result(chains=chains, broken=[p for p in broken if p.replica not in chains])


def _unexcused(torn: tuple[str, str, str | None], broken: list[Problem], by_replica: dict[str, Any]) -> None:
    _file, where, replica = torn
    broken.append(Problem(replica or "?", "broken", where, "the line is not a complete audit event"))


def _walk(replica: str, entries: list[_Entry], from_start: bool) -> Chain:
    chain = Chain(replica)
    prev: _Entry | None = None
    for i, e in enumerate(entries):
        ev = e.ev
        if hash_of(ev) != ev["hash"]:
            chain.problem = Problem(replica, "edited", e.where,
                                    f"event seq {ev['seq']} does not match its hash (its content was changed)")
            break
        if prev is None:
            chain.first_seq = ev["seq"]
            if ev["seq"] != 1 or ev["prev_hash"] != GENESIS:
                msg = f"the chain begins at seq {ev['seq']} ({e.where}): earlier events are not in the files given"
                if from_start:
                    chain.problem = Problem(replica, "missing", e.where, msg)
                    break
                chain.notes.append(msg)
        else:
            p = prev.ev
            want = p["seq"] + 1
            if ev["seq"] == want and ev["prev_hash"] == p["hash"]:
                pass
            elif ev.get("event") == "chain_restart" and ev["seq"] == 1 and ev["prev_hash"] == GENESIS:
                chain.notes.append(f"a new chain segment starts at {e.where}: {ev.get('reason', '')}")
            elif ev["seq"] == want:
                chain.problem = Problem(replica, "edited", prev.where,
                                        f"event seq {p['seq']} was changed or replaced: the next event "
                                        f"({e.where}) was chained to a different hash")
                break
            else:
                later = next((x for x in entries[i + 1:] if x.ev["seq"] == want), None)
                if later is not None or ev["seq"] <= p["seq"]:
                    at = later.where if later is not None else "earlier"
                    chain.problem = Problem(replica, "reordered", e.where,
                                            f"seq {ev['seq']} comes after seq {p['seq']} ({prev.where}); "
                                            f"seq {want} is at {at}")
                else:
                    gone = f"seq {want}" if ev["seq"] == want + 1 else f"seq {want}..{ev['seq'] - 1}"
                    chain.problem = Problem(replica, "missing", e.where,
                                            f"{gone} missing between {prev.where} and {e.where}")
                break
        chain.events += 1
        chain.last_seq, chain.last_hash = ev["seq"], ev["hash"]
        chain.last_event, chain.last_where = str(ev.get("event", "")), e.where
        prev = e
    return chain




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

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

Crash evidence. A ``chain_restart`` with reason ``unclean stop`` (the
writer found its chain not ending in ``audit_closed``) and every
``statement_start`` (write-ahead intent) whose outcome event (``start``:
its seq) never came make the verdict INCOMPLETE (exit 1): those statements
may have run with no record of how they ended. Starts still open at the end
of a chain that is still running are only noted.

Keys and anchors. With ``keys`` (key_id -> key) keyed events are checked by
their HMAC, and once a chain is keyed an unkeyed event in it is a re-chained
one. Without the key a keyed event's links are checked, its MAC is not (said
so). With ``anchors`` (chain heads the writer recorded in the state store)
each anchored (seq, hash) must be in the files: a missing one past the end is
a **deleted tail** (truncation), a different hash a **re-chained** file.
Without anchors, tail deletion cannot be seen from the chain alone: each
replica's last ``seq`` and ``hash`` are printed so they can be compared with
a copy kept elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.audit.chain import GENESIS, Keys, exact, hash_of, parse_line

UNCLEAN_STOP = "unclean stop"


@dataclass(frozen=True)
class Anchor:
    """A chain head recorded outside the file (the state store's audit_anchors table)."""

    replica: str
    seq: int
    hash: str
    at: str = ""  # when it was anchored, for the message

Line = tuple[str, int, bytes]  # file, line number (1-based), raw line


@dataclass(frozen=True)
class Problem:
    replica: str
    kind: str  # edited | missing | reordered | broken | truncated | re-chained | unkeyed
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
    key_ids: set[str] = field(default_factory=set)
    unkeyed: int = 0  # events without a key_id
    unchecked: int = 0  # keyed events whose key was not given (links checked, MAC not)
    unclean: list[str] = field(default_factory=list)  # "where: detail" of each unclean stop
    unfinished: list[str] = field(default_factory=list)  # statements started and never ended (crash evidence)
    running: list[str] = field(default_factory=list)  # started at the end of a chain still running
    anchors: int = 0  # anchors checked against this chain

    @property
    def complete(self) -> bool:
        return not self.unclean and not self.unfinished


@dataclass
class Result:
    chains: dict[str, Chain]
    broken: list[Problem]  # lines that belong to no replica

    keyed: bool = False  # keys were given
    anchored: str = ""  # where the anchors came from; "" none were given

    @property
    def ok(self) -> bool:
        return not self.broken and all(c.problem is None and c.complete for c in self.chains.values())


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

    def __init__(self, replica: str, from_start: bool, keys: Keys | None = None,
                 anchors: list[Anchor] | None = None, partial: bool = False) -> None:
        self.chain = Chain(replica)
        self.from_start = from_start
        self.partial = partial
        self.keys = keys
        self.anchors = anchors or []
        self.anchored = {a.seq for a in self.anchors}
        self.seen: dict[int, set[str]] = {}  # anchored seq -> hashes found at it
        self.open: dict[int, str] = {}  # statement_start seq -> where and what, until its outcome comes
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
        kid = ev.get("key_id")
        want = hash_of(ev, self.keys)
        if kid is None and self.keys:
            if c.key_ids:
                c.problem = Problem(c.replica, "unkeyed", where,
                                    f"event seq {ev['seq']} carries a plain SHA-256 in a chain keyed before it: the "
                                    "file was re-chained by someone without the key")
                return
            c.unkeyed += 1
        elif kid is not None:
            c.key_ids.add(str(kid))
            if want is None and self.keys:
                c.problem = Problem(c.replica, "unknown key", where,
                                    f"event seq {ev['seq']} is sealed with key {kid}, which none of the keys given "
                                    "is (a rotated key not given, or a forged key_id)")
                return
            if want is None:
                c.unchecked += 1
        if want is not None and want != ev["hash"]:
            what = "its MAC (the key's HMAC)" if kid is not None else "its hash"
            c.problem = Problem(c.replica, "edited", where,
                                f"event seq {ev['seq']} does not match {what} (its content was changed"
                                + (", or it was re-chained without the key)" if kid is not None else ")"))
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
        if ev["seq"] in self.anchored:
            self.seen.setdefault(ev["seq"], set()).add(ev["hash"])
        self._crash_evidence(ev, where)

    def _crash_evidence(self, ev: dict[str, Any], where: str) -> None:
        kind = ev.get("event")
        if kind == "statement_start":
            what = str(ev.get("statement", ""))
            self.open[ev["seq"]] = (f"{where}: seq {ev['seq']}, {ev.get('user', '?')} ({ev.get('role', '?')}): "
                                    f"{what[:120]}{'...' if len(what) > 120 else ''}")
        elif isinstance(ev.get("start"), int):
            self.open.pop(ev["start"], None)
        elif kind == "chain_restart" and ev.get("reason") == UNCLEAN_STOP:
            self.chain.unclean.append(f"{where}: {ev.get('detail', '')}")
            self._close_open("before this unclean stop")
        elif kind == "audit_closed":
            self._close_open("before a clean stop")

    def _close_open(self, when: str) -> None:
        for seq in sorted(self.open):
            self.chain.unfinished.append(f"{self.open[seq]} (no outcome {when})")
        self.open.clear()

    def end(self) -> Chain:
        c = self.chain
        if self.gap is not None:
            want, got, at, before = self.gap
            gone = f"seq {want}" if got == want + 1 else f"seq {want}..{got - 1}"
            c.problem = Problem(c.replica, "missing", at, f"{gone} missing between {before} and {at}")
        if self.keys and c.problem is None and c.events and not c.key_ids:
            c.problem = Problem(c.replica, "unkeyed", c.last_where or "?",
                                "no event of this chain is keyed: it was written without the key, or re-chained "
                                "by someone without it")
        c.running = [f"{w} (no outcome yet: still running, or lost with the tail)" for _s, w in sorted(self.open.items())]
        self._check_anchors()
        return c

    def _check_anchors(self) -> None:
        """Each anchor must be in the files: a different hash at its seq first (re-chained), then the newest
        anchor past the files' end (a cut tail)."""
        c = self.chain
        c.anchors = len(self.anchors)
        if c.problem is not None or not self.anchors:
            return
        for a in sorted(self.anchors, key=lambda a: a.seq):
            when = f" (anchored {a.at})" if a.at else ""
            if c.events and a.seq < c.first_seq:
                if self.from_start:
                    c.problem = Problem(c.replica, "missing", "?",
                                        f"anchor seq {a.seq}{when} lies before the first event in the files")
                    return
            elif c.events and a.seq <= c.last_seq and a.hash not in self.seen.get(a.seq, ()):
                c.problem = Problem(c.replica, "re-chained", "?",
                                    f"seq {a.seq} in the files does not carry the hash anchored in the state store"
                                    f"{when} ({a.hash[:16]}...): the chain was rewritten at or before seq {a.seq}")
                return
        newest = max(self.anchors, key=lambda a: a.seq)
        if c.events == 0 or newest.seq > c.last_seq:
            when = f" (anchored {newest.at})" if newest.at else ""
            end = f"the files end at seq {c.last_seq} ({c.last_where})" if c.events else "no event is in the files"
            if self.partial:
                c.notes.append(f"anchor at seq {newest.seq}{when} lies past the files given (--partial)")
                return
            c.problem = Problem(c.replica, "truncated", c.last_where or "?",
                                f"the state store holds an anchor at seq {newest.seq}{when}, but {end}: "
                                f"events {c.last_seq + 1}..{newest.seq} at least were deleted (the tail was cut, or "
                                "newer files were not given: --partial checks a part of the log)")


def verify(lines: Iterable[Line], *, from_start: bool = False, keys: Keys | None = None,
           anchors: Mapping[str, list[Anchor]] | None = None, anchored: str = "", partial: bool = False) -> Result:
    """Walk every replica's chain through ``lines`` (given in file order), streaming.

    ``keys``: key_id -> HMAC key; ``anchors``: replica -> its anchors from the state store (``anchored``
    says which store, for the report)."""
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
            w = walkers[ev["replica"]] = _Walker(ev["replica"], from_start, keys,
                                                 (anchors or {}).get(ev["replica"]), partial)
        if w.chain.problem is None and w.gap is None and hash_of(ev, keys) in (ev["hash"], None) \
                and not exact(raw, ev):
            # Same meaning, other bytes (a duplicate key, an escaped character): grep and the ticket
            # summaries read the bytes, so the bytes must be exactly what pgwarden wrote.
            w.chain.problem = Problem(ev["replica"], "edited", where,
                                      f"event seq {ev['seq']} is not byte for byte as written")
            continue
        w.add(ev, where)
    if torn is not None:
        broken.append(_unexcused(torn))
    for rep, anchored_list in (anchors or {}).items():
        if rep not in walkers and anchored_list and not partial:
            walkers[rep] = _Walker(rep, from_start, keys, anchored_list)  # anchored, yet no event in the files
    chains = {rep: w.end() for rep, w in walkers.items()}
    for p in broken:
        if p.replica in chains and chains[p.replica].problem is None:
            chains[p.replica].problem = p
    return Result(chains=chains, broken=[p for p in broken if p.replica not in chains], keyed=bool(keys),
                  anchored=anchored)


def _unexcused(torn: tuple[str, str, str | None]) -> Problem:
    _file, where, replica = torn
    return Problem(replica or "?", "broken", where, "the line is not a complete audit event")


def protection(result: Result, c: Chain) -> str:
    """How far this chain's verdict can be trusted: keyed and anchored, or not insider-proof."""
    if c.key_ids and not c.unchecked:
        keyed = f"keyed ({', '.join(sorted(c.key_ids))}), MACs checked"
    elif c.key_ids:
        keyed = (f"keyed ({', '.join(sorted(c.key_ids))}), {c.unchecked} MACs NOT checked (give the key: --key)")
    else:
        keyed = "NOT KEYED (plain SHA-256: anyone with write access can re-chain it; not insider-proof)"
    if result.anchored:
        anchored = f"{c.anchors} anchors checked against {result.anchored}"
    else:
        anchored = "no anchors checked (a cut tail cannot be seen)"
    return f"{keyed}; {anchored}"


def render(result: Result) -> list[str]:
    """Human-readable lines: one verdict per replica, then crash evidence, then notes."""
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
        head = f"{c.events} events, seq {c.first_seq}..{c.last_seq}, last hash {c.last_hash}; {end}"
        if c.complete:
            out.append(f"replica {rep}: intact, {head}")
        else:
            out.append(f"replica {rep}: INCOMPLETE: chain intact, {head}; {len(c.unclean)} unclean stop(s), "
                       f"{len(c.unfinished)} statement(s) started and never ended")
        for u in c.unclean:
            out.append(f"  UNCLEAN STOP at {u}")
        for u in c.unfinished:
            out.append(f"  STARTED, NEVER ENDED: {u}")
        out.append(f"  protection: {protection(result, c)}")
    for rep in sorted(result.chains):
        c = result.chains[rep]
        for r in c.running:
            out.append(f"  note ({rep}): started {r}")
        if c.unkeyed and c.key_ids:
            out.append(f"  note ({rep}): the first {c.unkeyed} events are not keyed (written before the key was set)")
        for n in c.notes:
            out.append(f"  note ({rep}): {n}")
    return out


def verdict(result: Result) -> tuple[str, str]:
    """(status, one line) for a report's header: ``verified`` / ``INCOMPLETE`` / ``FAILED`` / ``none``, and
    against what (keys, anchors), so a reader knows how far the pages below can be trusted."""
    if not result.chains and not result.broken:
        return "none", "no chained events in the files given"
    failed = [r for r, c in sorted(result.chains.items()) if c.problem is not None] + \
        [p.where for p in result.broken]
    incomplete = [r for r, c in sorted(result.chains.items()) if c.problem is None and not c.complete]
    keyed = all(c.key_ids and not c.unchecked for c in result.chains.values())
    how = ("keyed chains, MACs checked" if keyed else
           "NOT all chains keyed and checked (plain SHA-256 can be recomputed by anyone with write access)")
    anchors = sum(c.anchors for c in result.chains.values())
    how += f"; {anchors} anchors checked against {result.anchored}" if result.anchored else \
        "; no anchors checked (a cut tail would not show)"
    n = len(result.chains)
    if failed:
        return "FAILED", f"chain verification FAILED for {', '.join(failed)} ({how})"
    if incomplete:
        return "INCOMPLETE", (f"{n} chain(s) intact but INCOMPLETE (unclean stops or statements with no outcome) "
                              f"for {', '.join(incomplete)} ({how})")
    return "verified", f"{n} chain(s) verified intact ({how})"

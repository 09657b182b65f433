"""Verification of audit chains: pure, no Redis, usable offline with public keys only.

A writer's records are fed in stream order to a :class:`ChainVerifier`. Records between two
checkpoints form a *segment*; a segment is accepted when every record's hash matches its content,
the seqs run from the previous checkpoint's seq + 1 up to the closing checkpoint without gap,
duplicate or disorder, each ``prev`` is its predecessor's ``hash``, and the closing checkpoint's
Ed25519 signature verifies with a trusted key. Records after the last checkpoint are the
*unsealed tail*: checked the same way but not yet provable (anyone can recompute SHA-256; only
a signature binds). Problems are named (``altered``, ``missing``, ``inserted``, ``reordered``,
``bad_signature``, ``unsealed_tail``, ``chain_gone``, ``truncated``) and point at a record.

Incremental verification resumes from an :class:`Anchor`, the last checkpoint verified: the
anchor record must still be there with the same hash, and only what follows is read again.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.auditchain import (
    GENESIS,
    chain_hash,
    checkpoint_message,
    checkpoint_message_of,
    entry_of,
    is_checkpoint,
    parse_time,
)
from broker.signing import KeyRing

ALTERED = "altered"
MISSING = "missing"
INSERTED = "inserted"
REORDERED = "reordered"
BAD_SIGNATURE = "bad_signature"
UNSEALED_TAIL = "unsealed_tail"
CHAIN_GONE = "chain_gone"
TRUNCATED = "truncated"

# A checkpoint that starts a chain (older records removed by retention) must be at least this old
# minus the slack, which absorbs clock skew between replicas and the trim interval.
RETENTION_SLACK_S = 300.0
# Writers seal every 5 s; a tail older than this was left by a writer that died without sealing.
STALE_TAIL_S = 60.0
# Guard against a forged flood of records between two checkpoints exhausting memory.
MAX_SEGMENT = 1_000_000


class AnchorLost(Exception):
    """The anchor record of an incremental verification is gone or changed: start over."""


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a chain, pointing at the record where it shows."""

    problem: str
    writer: str
    id: str | None
    seq: int | None
    detail: str
    time: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "problem": self.problem, "writer": self.writer, "seq": self.seq,
                "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Anchor:
    """A verified checkpoint: where the next verification of its chain resumes."""

    id: str | None
    seq: int
    hash: str
    time: str | None
    covered: int  # records verified up to and including this one
    final: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq, "hash": self.hash, "time": self.time,
                "covered": self.covered, "final": self.final}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Anchor:
        return cls(
            id=data.get("id"), seq=int(data["seq"]), hash=str(data["hash"]),
            time=data.get("time"), covered=int(data.get("covered", 0)),
            final=bool(data.get("final", False)),
        )


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The verification of one writer's chain."""

    writer: str
    checked: int  # records read and checked in this run
    covered: int  # records vouched for, including those verified in earlier runs
    sealed_seq: int  # seq of the last verified checkpoint (0: none)
    sealed_time: str | None
    head_seq: int  # seq of the newest record
    unsealed: int  # records after the last checkpoint
    unsealed_since: str | None
    stale: bool  # the unsealed tail is older than a writer would leave it
    final: bool  # the chain ends with the writer's final checkpoint
    problem: Problem | None
    anchor: Anchor | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "writer": self.writer, "checked": self.checked, "covered": self.covered,
            "sealed_seq": self.sealed_seq, "sealed_time": self.sealed_time,
            "head_seq": self.head_seq, "unsealed": self.unsealed,
            "unsealed_since": self.unsealed_since, "stale": self.stale, "final": self.final,
            "problem": self.problem.to_dict() if self.problem else None,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """All chains: ``ok`` when none shows tampering (an unsealed tail alone does not count,
    unless verification was strict and the tail is stale)."""

    chains: tuple[ChainReport, ...]

    @property
    def ok(self) -> bool:
        return all(c.problem is None for c in self.chains)

    @property
    def checked(self) -> int:
        return sum(c.checked for c in self.chains)

    @property
    def covered(self) -> int:
        return sum(c.covered for c in self.chains)

    @property
    def first_bad(self) -> Problem | None:
        problems = [c.problem for c in self.chains if c.problem is not None]
        if not problems:
            return None
        return min(problems, key=lambda p: (p.time or "~", p.writer))

    @property
    def sealed_through(self) -> str | None:
        """Every record up to this time is sealed by a verified checkpoint."""
        tails = [c for c in self.chains if c.unsealed]
        if tails:
            if any(c.sealed_time is None for c in tails):
                return None
            return min(c.sealed_time for c in tails if c.sealed_time is not None)
        times = [c.sealed_time for c in self.chains if c.sealed_time is not None]
        return max(times) if times else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "checked": self.checked,
            "covered": self.covered,
            "sealed_through": self.sealed_through,
        }
        bad = self.first_bad
        if bad is not None:
            out["first_bad"] = bad.to_dict()
        out["unsealed"] = [
            {"writer": c.writer, "records": c.unsealed, "since": c.unsealed_since,
             "stale": c.stale}
            for c in self.chains if c.unsealed
        ]
        out["writers"] = [c.to_dict() for c in self.chains]
        return out


def _seq(record: Mapping[str, Any]) -> int | None:
    seq = record.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


class ChainVerifier:
    """Verifies one writer's records, fed in stream order (oldest first)."""

    def __init__(
        self,
        writer: str,
        keys: KeyRing,
        *,
        anchor: Anchor | None = None,
        retention_s: float | None = None,
        now: float | None = None,
        max_segment: int = MAX_SEGMENT,
    ) -> None:
        self.writer = writer
        self._keys = keys
        self._anchor_in = anchor
        self._retention_s = retention_s
        self._now = now
        self._max_segment = max_segment
        self._base: Anchor | None = None
        self._seg: list[dict[str, Any]] = []
        self._started = False
        self._last: dict[str, Any] | None = None
        self.checked = 0
        self.problem: Problem | None = None

    # -- feeding -------------------------------------------------------------------------------

    def feed(self, record: dict[str, Any]) -> bool:
        """Check one record; False once a problem is found (feeding more changes nothing)."""
        if self.problem is not None:
            return False
        if not self._started:
            self._started = True
            if self._anchor_in is not None:
                a = self._anchor_in
                if (record.get("id") != a.id or record.get("hash") != a.hash
                        or chain_hash(record) != a.hash):
                    raise AnchorLost(self.writer)
                self._base, self._last = a, record
                return True
            return self._start(record)
        self.checked += 1
        self._last = record
        self._seg.append(record)
        if is_checkpoint(record):
            self._close_segment()
        elif len(self._seg) > self._max_segment:
            self._fail(self._seg, len(self._seg) - 1, INSERTED,
                       f"more than {self._max_segment} records without a checkpoint")
        return self.problem is None

    def _start(self, record: dict[str, Any]) -> bool:
        """First record without an anchor: seq 1, or a checkpoint left by retention."""
        self.checked += 1
        self._last = record
        if _seq(record) == 1 or not is_checkpoint(record) or _seq(record) is None:
            self._base = Anchor(None, 0, GENESIS, None, 0)
            self._seg = [record]
            if _seq(record) not in (1, None) and record.get("writer") == self.writer:
                if chain_hash(record) != record.get("hash"):
                    self._fail(self._seg, 0, ALTERED, "content does not match its hash")
                else:
                    self._fail(self._seg, 0, MISSING,
                               f"the chain starts at seq {_seq(record)} without a checkpoint: "
                               f"seq 1..{(_seq(record) or 1) - 1} are missing")
                return False
            if is_checkpoint(record):
                self._close_segment()
            return self.problem is None
        # A chain whose head was trimmed by retention starts at a signed checkpoint.
        seg = [record]
        problems = self._record_problems(seg)
        problems += self._signature_problems(seg, 0)
        if not problems:
            t = parse_time(record.get("time"))
            if self._retention_s is not None and self._now is not None and (
                t is None or t > self._now - self._retention_s + RETENTION_SLACK_S
            ):
                problems.append((0, self._problem(
                    record, MISSING,
                    f"records before seq {record['seq']} are gone, but this checkpoint is "
                    "younger than the retention period: they were not removed by retention")))
        if problems:
            self.problem = min(problems, key=lambda p: p[0])[1]
            return False
        self._base = Anchor(record.get("id"), record["seq"], record["hash"], record.get("time"),
                            1, bool(record["details"].get("final")))
        return True

    def _close_segment(self) -> None:
        base = self._base
        assert base is not None
        seg = self._seg
        problems = self._analyse(seg, base, closing=True)
        if problems:
            self.problem = min(problems, key=lambda p: p[0])[1]
            return
        cp = seg[-1]
        covered = (self._anchor_in.covered if self._anchor_in else 0) + self.checked
        self._base = Anchor(cp.get("id"), cp["seq"], cp["hash"], cp.get("time"), covered,
                            bool(cp["details"].get("final")))
        self._seg = []

    # -- analysis ------------------------------------------------------------------------------

    def _problem(self, record: Mapping[str, Any], kind: str, detail: str) -> Problem:
        rid = record.get("id")
        t = record.get("time")
        return Problem(kind, self.writer, rid if isinstance(rid, str) else None, _seq(record),
                       detail, t if isinstance(t, str) else None)

    def _fail(self, seg: list[dict[str, Any]], index: int, kind: str, detail: str) -> None:
        self.problem = self._problem(seg[index], kind, detail)

    def _record_problems(self, seg: list[dict[str, Any]]) -> list[tuple[int, Problem]]:
        """Per-record checks: the right chain, well-formed chain fields, hash matches content."""
        out = []
        for i, r in enumerate(seg):
            if r.get("writer") != self.writer:
                detail = f"carries writer {r.get('writer')!r}: not this chain"
                out.append((i, self._problem(r, INSERTED, detail)))
            elif _seq(r) is None or not isinstance(r.get("prev"), str):
                out.append((i, self._problem(r, ALTERED, "chain fields are malformed")))
            elif chain_hash(r) != r.get("hash"):
                out.append((i, self._problem(r, ALTERED, "content does not match its hash")))
        return out

    def _signature_problems(self, seg: list[dict[str, Any]], i: int) -> list[tuple[int, Problem]]:
        cp = seg[i]
        message = checkpoint_message_of(cp)
        details: dict[str, Any] = cp["details"] if isinstance(cp.get("details"), dict) else {}
        if message is None or not isinstance(details.get("signature"), str):
            return [(i, self._problem(cp, BAD_SIGNATURE, "checkpoint fields are malformed"))]
        key = self._keys.get(details.get("key_id"))
        if key is None:
            return [(i, self._problem(cp, BAD_SIGNATURE,
                                      f"signed with key id {details.get('key_id')!r}, which is "
                                      "not a trusted public key"))]
        if not key.verify(message, details["signature"]):
            return [(i, self._problem(cp, BAD_SIGNATURE, "the signature does not verify"))]
        return []

    def _analyse(
        self, seg: list[dict[str, Any]], base: Anchor, *, closing: bool
    ) -> list[tuple[int, Problem]]:
        """Every problem of a segment as (stream index, problem); the caller takes the first."""
        problems = self._record_problems(seg)
        bad = {i for i, _ in problems}
        valid = [i for i in range(len(seg)) if i not in bad]
        if base.final and seg:
            problems.append((0, self._problem(seg[0], INSERTED,
                                              "follows the writer's final checkpoint")))
        last = len(seg) - 1
        if closing:
            if last in bad:
                return problems
            problems += self._signature_problems(seg, last)
            end = _seq(seg[last])
        else:
            end = max((_seq(seg[i]) or 0 for i in valid), default=None)
        if end is None:
            return problems
        problems += self._link_problems(seg, valid, base, end)
        return problems

    def _link_problems(
        self, seg: list[dict[str, Any]], valid: list[int], base: Anchor, end: int
    ) -> list[tuple[int, Problem]]:
        """Walk seqs base+1..end: each exactly once, linked by prev, in stream order."""
        out: list[tuple[int, Problem]] = []
        by_seq: dict[int, list[int]] = {}
        for i in valid:
            s = seg[i]["seq"]
            if s <= base.seq:
                out.append((i, self._problem(seg[i], INSERTED,
                                             f"seq {s} repeats a seq sealed up to {base.seq}")))
            elif s > end:
                out.append((i, self._problem(seg[i], REORDERED,
                                             f"seq {s} is stored before the checkpoint seq {end}")))
            else:
                by_seq.setdefault(s, []).append(i)
        present = sorted(by_seq)

        def supported(i: int, s: int) -> bool:
            # Genuine if its successor commits to its hash (the newest record has no successor;
            # a closing checkpoint is vouched for by its signature, checked separately).
            if s == end:
                return True
            return any(seg[j]["prev"] == seg[i]["hash"] for j in by_seq.get(s + 1, ()))

        exp_prev, prev_idx = base.hash, None
        for s in range(base.seq + 1, end + 1):
            cands = by_seq.get(s)
            if not cands:
                nxt = present[bisect.bisect_right(present, s)]
                j = by_seq[nxt][0]
                gap = f"seq {s}" if nxt == s + 1 else f"seqs {s}..{nxt - 1}"
                out.append((j, self._problem(seg[j], MISSING, f"{gap} missing before this record")))
                break
            linked = [i for i in cands if seg[i]["prev"] == exp_prev]
            if not linked:
                c = cands[0]
                if prev_idx is not None and supported(c, s):
                    out.append((prev_idx, self._problem(
                        seg[prev_idx], ALTERED,
                        f"its successor (seq {s}) commits to a different hash: rewritten")))
                else:
                    out.append((c, self._problem(
                        seg[c], ALTERED, "does not link to the previous record: rewritten")))
                break
            pick = next((i for i in linked if supported(i, s)), linked[0])
            for i in cands:
                if i != pick:
                    detail = f"a second record with seq {s}"
                    out.append((i, self._problem(seg[i], INSERTED, detail)))
            if prev_idx is not None and pick < prev_idx:
                out.append((pick, self._problem(seg[pick], REORDERED,
                                                f"seq {s} is stored before seq {s - 1}")))
            exp_prev, prev_idx = seg[pick]["hash"], pick
        return out

    # -- result --------------------------------------------------------------------------------

    def finish(
        self,
        *,
        sealed_state: Mapping[str, Any] | None = None,
        registered: bool = False,
        strict: bool = False,
        stale_after_s: float = STALE_TAIL_S,
    ) -> ChainReport:
        """Close the run: check the unsealed tail, the writer's recorded last checkpoint
        (``sealed_state``) and, for a ``registered`` writer, that its chain exists at all.
        Raises :class:`AnchorLost` when resuming and the anchor record never came."""
        if self._anchor_in is not None and not self._started:
            raise AnchorLost(self.writer)
        base = self._base
        tail = self._seg if self.problem is None else []
        if self.problem is None and tail and base is not None:
            problems = self._analyse(tail, base, closing=False)
            if problems:
                self.problem = min(problems, key=lambda p: p[0])[1]
        if self.problem is None and not self._started and (registered or sealed_state):
            self.problem = Problem(CHAIN_GONE, self.writer, None, None,
                                   "the writer is registered but its chain is gone")
        sealed_seq = base.seq if base is not None else 0
        if self.problem is None and sealed_state is not None:
            self.problem = self._check_sealed_state(sealed_state, sealed_seq)
        since = tail[0].get("time") if tail else None
        since_t = parse_time(since)
        stale = bool(tail) and self._now is not None and (
            since_t is None or since_t < self._now - stale_after_s)
        if self.problem is None and strict and stale:
            self.problem = self._problem(
                tail[0], UNSEALED_TAIL,
                f"{len(tail)} record(s) from here on were never sealed by a checkpoint")
        last = self._last or {}
        covered = (self._anchor_in.covered if self._anchor_in else 0) + self.checked
        anchor = base if base is not None and base.seq > 0 and self.problem is None else None
        return ChainReport(
            writer=self.writer,
            checked=self.checked,
            covered=covered,
            sealed_seq=sealed_seq,
            sealed_time=base.time if base is not None and base.seq > 0 else None,
            head_seq=_seq(last) or 0,
            unsealed=len(tail),
            unsealed_since=since if isinstance(since, str) else None,
            stale=stale,
            final=bool(base and base.final and not tail),
            problem=self.problem,
            anchor=anchor,
        )

    def _check_sealed_state(self, state: Mapping[str, Any], sealed_seq: int) -> Problem | None:
        """The writer's last checkpoint as recorded beside the chain: signed, so it can be
        removed or rolled back but not advanced; a chain ending below it was truncated."""
        try:
            message = checkpoint_message(
                writer=state["writer"], seq=state["seq"], prev=state["prev"],
                time=state["time"], key_id=state["key_id"], final=state["final"])
            key = self._keys.get(state["key_id"])
            valid = key is not None and key.verify(message, state["signature"])
        except (KeyError, TypeError):
            valid = False
        if not valid or state.get("writer") != self.writer:
            return Problem(BAD_SIGNATURE, self.writer, None, None,
                           "the writer's recorded last checkpoint does not verify")
        if int(state["seq"]) > sealed_seq:
            last = self._last or {}
            rid = last.get("id")
            return Problem(
                TRUNCATED, self.writer, rid if isinstance(rid, str) else None, _seq(last),
                f"the writer sealed up to seq {state['seq']}, but its chain ends at seq "
                f"{_seq(last) or 0} (last checkpoint seq {sealed_seq}): newest records removed",
                last.get("time") if isinstance(last.get("time"), str) else None)
        return None


def verify_records(
    records: Iterable[Mapping[str, Any]],
    keys: KeyRing,
    *,
    state: Mapping[str, Anchor] | None = None,
    retention_s: float | None = None,
    now: float | None = None,
    strict: bool = False,
) -> tuple[VerifyReport, dict[str, Anchor]]:
    """Verify an export (records of any writers, e.g. NDJSON from the API or stdout).

    Records are grouped by writer and put in stream order by their ``id``; records marked
    ``stored: false`` never reached the chain and are skipped. With ``state`` (anchors of an
    earlier run), each chain resumes at its anchor when it is still present and unchanged.
    Returns the report and the new state.
    """
    chains: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("stored") is False or not isinstance(r.get("writer"), str):
            continue
        chains.setdefault(r["writer"], []).append(dict(r))
    reports, new_state = [], {}
    for writer in sorted(chains):
        rows = chains[writer]
        rows.sort(key=lambda r: entry_of(r.get("id")) or (1 << 62, 0))
        anchor = (state or {}).get(writer)
        report = _verify_rows(writer, rows, keys, anchor, retention_s, now, strict)
        if report.anchor is not None:
            new_state[writer] = report.anchor
        reports.append(report)
    return VerifyReport(tuple(reports)), new_state


def _verify_rows(
    writer: str,
    rows: list[dict[str, Any]],
    keys: KeyRing,
    anchor: Anchor | None,
    retention_s: float | None,
    now: float | None,
    strict: bool,
) -> ChainReport:
    def run(anchor: Anchor | None, start: int) -> ChainReport:
        cv = ChainVerifier(writer, keys, anchor=anchor, retention_s=retention_s, now=now)
        for r in rows[start:]:
            if not cv.feed(r):
                break
        return cv.finish(strict=strict)

    if anchor is not None:
        start = next((i for i, r in enumerate(rows) if r.get("id") == anchor.id), -1)
        if start >= 0:
            try:
                return run(anchor, start)
            except AnchorLost:
                pass
    return run(None, 0)

"""Verification finds each kind of tampering, points at the right record, and cannot be fooled
by someone holding the public key and full Redis access. Live (Redis) and offline (export)
verification agree."""

from __future__ import annotations

import time

import fakeredis
import pytest

from broker.audit import AuditLog, AuditRecord, rfc3339
from broker.auditchain import chain_hash, checkpoint_message
from broker.auditstore import LiveVerifier
from broker.auditverify import Anchor, ChainVerifier, verify_records
from broker.signing import KeyRing, SigningKey
from tests import audit_tamper as T

KEY = SigningKey.generate()
RING = KeyRing([KEY.public])


def rec(i: int) -> AuditRecord:
    return AuditRecord(time=rfc3339(time.time()), request_id=f"r{i}", event="token.exchange",
                       decision="issued", reason="issued", role="flux-source-reader")


class Chains:
    """Two writers on one Redis, 23 records each, checkpoint every 5, both stopped."""

    def __init__(self, signer: SigningKey = KEY, n: int = 23, close: bool = True) -> None:
        self.redis = fakeredis.FakeRedis()
        self.logs = [AuditLog(self.redis, prefix="v:", stdout=False, signer=signer,
                              checkpoint_every=5, writer=w) for w in ("wa", "wb")]
        for i in range(n):
            for log in self.logs:
                log.append(rec(i))
        if close:
            for log in self.logs:
                log.close()
        self.store = self.logs[0].store
        self.keys = self.store.keys

    def verify(self, ring: KeyRing = RING, **kw):
        return LiveVerifier(self.store, ring, retention_s=None).verify(**kw)

    def export(self):
        """All records, as paging GET /v1/audit/events would give them (newest first)."""
        out, cursor = [], None
        while True:
            page, cursor = self.store.events(limit=7, cursor=cursor)
            out.extend(page)
            if cursor is None:
                return out


@pytest.fixture
def chains():
    return Chains()


def test_intact_chains_verify(chains):
    report = chains.verify()
    d = report.to_dict()
    # 23 records + 4 checkpoints (every 5) + the final one, per writer
    assert d["ok"] is True and d["checked"] == 2 * 28 and "first_bad" not in d
    assert d["unsealed"] == [] and d["sealed_through"] is not None
    assert all(c["final"] and c["sealed_seq"] == 28 for c in d["writers"])


def test_offline_export_agrees(chains):
    live = chains.verify().to_dict()
    offline, _ = verify_records(chains.export(), RING)
    assert offline.to_dict()["ok"] is True
    assert offline.checked == live["checked"] and offline.sealed_through == live["sealed_through"]


TAMPERINGS = {
    # name: (tamper(chains) -> expected first_bad id, expected problem)
    "change a field": (lambda c: T.change_field(c.redis, c.keys, "wa", 7, rehash=False,
                                                service_account="evil@x"), "altered"),
    "change a field, rehash": (lambda c: T.change_field(c.redis, c.keys, "wa", 7, rehash=True,
                                                        service_account="evil@x"), "altered"),
    "delete a record": (lambda c: T.delete_record(c.redis, c.keys, "wa", 7), "missing"),
    "insert a forged record": (lambda c: T.insert_forged(c.redis, c.keys, "wa", 7,
                                                         role="admin"), "inserted"),
    "swap two": (lambda c: T.swap(c.redis, c.keys, "wa", 7, 8), "reordered"),
    "drop the newest": (lambda c: T.drop_newest(c.redis, c.keys, "wa", 4), "truncated"),
    "forge a checkpoint signature": (
        lambda c: T.change_field(c.redis, c.keys, "wa", 5, rehash=True,
                                 details={"key_id": KEY.key_id, "signature": "AAAA",
                                          "final": False, "records": 5}), "bad_signature"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_each_tampering_is_found_at_the_right_record(chains, name):
    tamper, problem = TAMPERINGS[name]
    expected_id = tamper(chains)
    report = chains.verify(full=True)
    assert report.ok is False
    bad = report.first_bad
    assert (bad.problem, bad.id, bad.writer) == (problem, expected_id, "wa"), bad
    assert all(c.problem is None for c in report.chains if c.writer == "wb")
    if problem != "truncated":  # the sealed state is not part of an export
        offline, _ = verify_records(chains.export(), RING)
        assert offline.first_bad.to_dict() == bad.to_dict()


def test_deleting_a_whole_chain_is_found(chains):
    T.delete_chain(chains.redis, chains.keys, "wa")
    bad = chains.verify().first_bad
    assert (bad.problem, bad.writer) == ("chain_gone", "wa")


def test_forgery_cannot_be_made_to_verify_with_the_public_key_only(chains):
    """Rewrite a record, recompute every later hash, and re-sign checkpoints with a key of
    one's own: still found, because only trusted keys verify."""
    mallory = SigningKey.generate()
    rows = T.entries(chains.redis, chains.keys, "wa")
    rows[2][1]["service_account"] = "evil@x"
    prev = rows[1][1]["hash"]
    for _, body in rows[2:]:
        body["prev"] = prev
        if body["event"] == "audit.checkpoint":
            msg = checkpoint_message(writer="wa", seq=body["seq"], prev=prev, time=body["time"],
                                     key_id=KEY.key_id, final=body["details"]["final"])
            body["details"]["signature"] = mallory.sign(msg)  # claims the real key id
        body["hash"] = chain_hash(body)
        prev = body["hash"]
    T.rewrite(chains.redis, chains.keys, "wa", rows)
    bad = chains.verify().first_bad
    assert bad.problem == "bad_signature" and bad.seq == 6  # the first checkpoint
    # With her own key id, the key is simply not trusted.
    for _, body in rows:
        if body["event"] == "audit.checkpoint":
            body["details"]["key_id"] = mallory.key_id
            body["details"]["signature"] = mallory.sign(checkpoint_message(
                writer="wa", seq=body["seq"], prev=body["prev"], time=body["time"],
                key_id=mallory.key_id, final=body["details"]["final"]))
            body["hash"] = chain_hash(body)
    bad = chains.verify(full=True).first_bad
    assert bad.problem in ("bad_signature", "altered")


def test_forged_records_after_the_last_checkpoint_stay_unsealed():
    c = Chains(close=False, n=7)  # seq 1-5, cp 6, 7-8 unsealed
    rows = T.entries(c.redis, c.keys, "wa")
    forged = dict(rows[-1][1], seq=rows[-1][1]["seq"] + 1, prev=rows[-1][1]["hash"], role="x")
    forged["hash"] = chain_hash(forged)
    T.rewrite(c.redis, c.keys, "wa", T._increasing([*rows, ("", forged)]))
    report = c.verify()
    assert report.ok  # indistinguishable from a real record, but...
    chain = next(ch for ch in report.chains if ch.writer == "wa")
    assert chain.sealed_seq == 6 and chain.unsealed == 3  # ...not vouched for by a signature
    assert report.to_dict()["unsealed"][0]["writer"] == "wa"


def test_strict_fails_on_a_stale_unsealed_tail():
    c = Chains(close=False, n=7)
    later = LiveVerifier(c.store, RING, retention_s=None, clock=lambda: time.time() + 3600)
    assert later.verify().ok
    report = later.verify(strict=True, full=True)
    assert not report.ok and report.first_bad.problem == "unsealed_tail"
    assert report.first_bad.seq == 7


def test_records_after_a_final_checkpoint_are_inserted(chains):
    rows = T.entries(chains.redis, chains.keys, "wb")
    extra = dict(rows[-2][1], seq=rows[-1][1]["seq"] + 1, prev=rows[-1][1]["hash"])
    extra["hash"] = chain_hash(extra)
    T.rewrite(chains.redis, chains.keys, "wb", T._increasing([*rows, ("", extra)]))
    bad = chains.verify().first_bad
    assert (bad.problem, bad.writer, bad.seq) == ("inserted", "wb", 29)


def test_rolled_back_or_forged_sealed_state(chains):
    chains.redis.set(chains.keys.sealed("wa"), b'{"writer": "wa", "seq": 99}')
    bad = chains.verify().first_bad
    assert (bad.problem, bad.writer) == ("bad_signature", "wa")


def test_key_rotation_old_checkpoints_verify_with_the_previous_public_key():
    old, new = SigningKey.generate(), SigningKey.generate()
    c = Chains(signer=old, n=6)
    newer = AuditLog(c.redis, prefix="v:", stdout=False, signer=new, checkpoint_every=5,
                     writer="wc")
    for i in range(6):
        newer.append(rec(i))
    newer.close()
    assert c.verify(KeyRing([new.public, old.public])).ok
    report = c.verify(KeyRing([new.public]))
    assert not report.ok and report.first_bad.problem == "bad_signature"
    assert report.first_bad.writer in ("wa", "wb") and "not a trusted" in report.first_bad.detail
    offline, _ = verify_records(c.export(), KeyRing([new.public, old.public]))
    assert offline.ok


def test_incremental_resumes_from_the_last_verified_checkpoint():
    c = Chains(close=False, n=12)  # per writer: 1-5, cp6, 7-11, cp12, 13-14
    v = LiveVerifier(c.store, RING, retention_s=None)
    first = v.verify()
    assert first.ok and first.checked == 28
    again = v.verify()
    assert again.ok and again.checked == 2 * 2  # only the unsealed tail, 13-14, again
    assert again.covered == first.covered
    for log in c.logs:
        log.append(rec(99))
    more = v.verify()
    assert more.ok and more.checked == 2 * 3 and more.covered == first.covered + 2
    # Tampering before the anchor is only seen by a full pass; after it, incrementally.
    T.change_field(c.redis, c.keys, "wa", 1, rehash=False, role="x")
    assert v.verify().ok
    assert v.verify(full=True).first_bad.problem == "altered"


def test_incremental_starts_over_when_the_anchor_is_gone():
    c = Chains(n=12)
    v = LiveVerifier(c.store, RING, retention_s=None)
    assert v.verify().ok
    T.drop_newest(c.redis, c.keys, "wa", 1)  # the anchor (final checkpoint) itself
    bad = v.verify().first_bad
    assert (bad.problem, bad.writer) == ("truncated", "wa")


def test_offline_state_file_round_trip():
    c = Chains(n=12)
    report, state = verify_records(c.export(), RING)
    assert report.ok and set(state) == {"wa", "wb"}
    restored = {w: Anchor.from_dict(a.to_dict()) for w, a in state.items()}
    again, _ = verify_records(c.export(), RING, state=restored)
    assert again.ok and again.checked == 0 and again.covered == report.covered


def test_stdout_witness_skips_records_marked_not_stored():
    c = Chains(n=3)
    records = c.export()
    failed = dict(records[0], stored=False, seq=1)
    report, _ = verify_records([*records, failed], RING)
    assert report.ok


def test_chain_starting_without_a_checkpoint_is_missing_its_head():
    c = Chains(n=6)
    rows = T.entries(c.redis, c.keys, "wa")
    T.rewrite(c.redis, c.keys, "wa", rows[2:])
    bad = c.verify().first_bad
    assert (bad.problem, bad.seq) == ("missing", 3)


def test_garbage_entries_are_reported_not_crashing(chains):
    key = chains.keys.chain("wa")
    rows = chains.redis.xrange(key)
    chains.redis.delete(key)
    for i, (eid, fields) in enumerate(rows):
        chains.redis.xadd(key, {"r": b"not json"} if i == 3 else fields, id=eid)
    bad = chains.verify().first_bad
    assert bad.problem == "altered" and bad.id == f"wa/{rows[3][0].decode()}"


def test_chain_verifier_reports_a_second_record_with_the_same_seq_before_the_genuine_one():
    c = Chains(n=6)
    rows = T.entries(c.redis, c.keys, "wa")
    genuine = rows[2][1]
    forged = dict(genuine, role="admin")
    forged["hash"] = chain_hash(forged)  # same seq and prev as the genuine record
    T.rewrite(c.redis, c.keys, "wa", T._increasing([*rows[:2], ("", forged), *rows[2:]]))
    cv = ChainVerifier("wa", RING)
    for r in c.store.chain("wa"):
        if not cv.feed(r):
            break
    problem = cv.finish().problem
    assert problem.problem == "inserted" and problem.seq == 3
    assert problem.id == f"wa/{T.entries(c.redis, c.keys, 'wa')[2][0]}"


def test_a_record_id_with_non_ascii_digits_is_reported_not_crashing(chains):
    """"¹".isdigit() is true but int() refuses it: such an id has no stream position."""
    records = chains.export()
    victim = next(r for r in records if r.get("writer") == "wa" and r.get("seq") == 3)
    writer, _, entry = victim["id"].rpartition("/")
    victim["id"] = f"{writer}/\u00b9{entry[1:]}"
    report, _ = verify_records(records, RING)
    assert report.ok is False
    assert report.first_bad is not None and report.first_bad.writer == "wa"

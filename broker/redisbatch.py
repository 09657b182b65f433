"""Many Redis commands in one atomic script call: one request, one reply.

The audit hot path writes several commands per record (the chain entry, index entries,
counters), for every record of a group commit. As a MULTI/EXEC, the client packs each command and
parses a ``QUEUED`` reply for each; here they travel as the arguments of one ``EVALSHA`` of a
tiny script that runs them in order, atomically (nothing else runs between them), and answers
once. Commands are recorded with redis-py's own command methods (:class:`CommandRecorder`), so
callers write ``batch.xadd(...)`` exactly as they would on a pipeline.

A batch may carry :class:`Condition` s, checked in the same script before anything is written:
rate-limit hits that must stay within their limits, and keys that must still hold a value (the
token memo's purge generation). If any fails, the batch writes nothing and says which failed, so
the caller can drop those items and run the rest: a request's rate limits and its audit record
then cost one round trip together.

Works on Redis (scripts are standard) and on the embedded ``memory://`` store (fakeredis with
its Lua extra). Keys are passed as arguments rather than ``KEYS``: the audit indexes span hash
slots anyway (see docs/audit.md on Redis Cluster).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import redis
from redis.commands.core import CoreCommands

# ARGV: G, then G conditions of five arguments each (op, key, arg, limit, ttl), then the commands
# (argc1, cmd1..., argc2, cmd2..., ...). Every condition is checked before anything is written:
# if any fails, nothing is written and the script answers the failed conditions' numbers
# (1-based); otherwise it runs each command in order, then applies the counts, and answers an
# empty list. A command's error aborts the script: Redis runs a script atomically (nothing else
# in between) but does not undo the writes before the error; the counts come last, so a batch
# that fails this way (a key of the wrong type, out of memory) counts no hit. One command exists
# only here: XADDS minid field value key... = XADD key MINID ~ minid * field value, for each key
# (see CommandRecorder.xadds).
SCRIPT = """
local g = tonumber(ARGV[1])
local failed = {}
local seen = {}
local values = {}
local i = 2
for c = 1, g do
  local op, key, arg = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'count' then
    local counts = seen[key]
    if counts == nil then counts = {}; seen[key] = counts end
    local n = counts[arg]
    if n == nil then n = tonumber(redis.call('HGET', key, arg) or '0') end
    n = n + 1
    counts[arg] = n
    if n > tonumber(ARGV[i + 3]) then failed[#failed + 1] = c end
  elseif op == 'equals' then
    local value = values[key]
    if value == nil then value = redis.call('GET', key) or ''; values[key] = value end
    if value ~= arg then failed[#failed + 1] = c end
  else
    return redis.error_reply('unknown condition ' .. tostring(op))
  end
  i = i + 5
end
if #failed > 0 then return failed end
local n = #ARGV
while i <= n do
  local argc = tonumber(ARGV[i])
  if ARGV[i + 1] == 'XADDS' then
    local minid, f, v = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    for k = i + 5, i + argc do
      redis.call('XADD', ARGV[k], 'MINID', '~', minid, '*', f, v)
    end
  else
    redis.call(unpack(ARGV, i + 1, i + argc))
  end
  i = i + argc + 1
end
local expiring = {}
local j = 2
for c = 1, g do
  if ARGV[j] == 'count' then
    local key = ARGV[j + 1]
    redis.call('HINCRBY', key, ARGV[j + 2], 1)
    if expiring[key] == nil then
      expiring[key] = true
      if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ARGV[j + 4]) end
    end
  end
  j = j + 5
end
return {}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


@dataclass(frozen=True, slots=True)
class Condition:
    """A precondition of a batch, checked atomically with it (see :func:`run_atomically`).

    ``count``: one hit of hash field ``arg`` of ``key``, within ``limit`` (the hit is counted
    only when the whole batch is written; the hash gets ``ttl_s`` when it has no expiry).
    ``equals``: string ``key`` holds ``arg`` (a missing key holds ``""``).
    """

    op: Literal["count", "equals"]
    key: str
    arg: str
    limit: int = 0
    ttl_s: int = 0

    @classmethod
    def count(cls, key: str, field: str, limit: int, ttl_s: int) -> Condition:
        return cls("count", key, field, limit, ttl_s)

    @classmethod
    def equals(cls, key: str, value: str) -> Condition:
        return cls("equals", key, value)


class CommandRecorder(CoreCommands):
    """Records commands issued through redis-py's command methods instead of sending them."""

    _event_dispatcher: Any = None  # required by redis-py's command mixins; unused here

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> CommandRecorder:
        self.commands.append(args)
        return self

    def __len__(self) -> int:
        return len(self.commands)

    def xadds(self, keys: Sequence[str], minid: int, field: str, value: str) -> None:
        """``XADD key MINID ~ minid * field value`` for each of ``keys``, as one command of
        the batch script (a fraction of the arguments to pack and parse). Only
        :func:`run_atomically` runs it."""
        if keys:
            self.commands.append(("XADDS", minid, field, value, *keys))


class Runner(Protocol):
    """Something that sends recorded commands and returns their replies (a Multiplexer)."""

    def run(self, recorder: CommandRecorder) -> list[Any]: ...


def run_atomically(
    client: redis.Redis,
    recorder: CommandRecorder,
    runner: Runner | None = None,
    conditions: Sequence[Condition] = (),
) -> tuple[int, ...]:
    """Run every recorded command in one script call (through ``runner`` when given, to share
    its round trip), provided every one of ``conditions`` holds.

    Returns the positions in ``conditions`` of those that failed: then nothing was written (no
    command run, no hit counted). Raises ``redis.RedisError``.
    """
    if not recorder.commands and not conditions:
        return ()
    flat: list[Any] = [len(conditions)]
    for c in conditions:
        flat.extend((c.op, c.key, c.arg, c.limit, c.ttl_s))
    for command in recorder.commands:
        flat.append(len(command))
        flat.extend(command)
    if runner is None:
        try:
            reply = client.evalsha(SCRIPT_SHA, 0, *flat)
        except redis.exceptions.NoScriptError:
            # First use on this server (or after SCRIPT FLUSH).
            reply = client.eval(SCRIPT, 0, *flat)
        return _failed(reply)
    call = CommandRecorder()
    call.execute_command("EVALSHA", SCRIPT_SHA, 0, *flat)
    try:
        replies = runner.run(call)
    except redis.exceptions.NoScriptError:
        call = CommandRecorder()
        call.execute_command("EVAL", SCRIPT, 0, *flat)
        replies = runner.run(call)
    return _failed(replies[0])


def _failed(reply: Any) -> tuple[int, ...]:
    if not isinstance(reply, list):
        raise redis.RedisError(f"batch script answered {type(reply).__name__}, not a list")
    return tuple(int(n) - 1 for n in reply)

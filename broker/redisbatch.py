"""Many Redis commands in one atomic script call: one request, one reply.

The audit hot path writes several commands per record (the chain entry, index entries,
counters), for every record of a group commit. As a MULTI/EXEC, the client packs each command and
parses a ``QUEUED`` reply for each; here they travel as the arguments of one ``EVALSHA`` of a
tiny script that runs them in order, atomically (nothing else runs between them), and answers
once. Commands are recorded with redis-py's own command methods (:class:`CommandRecorder`), so
callers write ``batch.xadd(...)`` exactly as they would on a pipeline.

Works on Redis (scripts are standard) and on the embedded ``memory://`` store (fakeredis with
its Lua extra). Keys are passed as arguments rather than ``KEYS``: the audit indexes span hash
slots anyway (see docs/audit.md on Redis Cluster).
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import redis
from redis.commands.core import CoreCommands

# ARGV: argc1, cmd1..., argc2, cmd2..., ... Runs each command in order; errors abort the script.
SCRIPT = """
local i = 1
local n = #ARGV
while i <= n do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + argc + 1
end
return n
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


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


class Runner(Protocol):
    """Something that sends recorded commands and returns their replies (a Multiplexer)."""

    def run(self, recorder: CommandRecorder) -> list[Any]: ...


def run_atomically(
    client: redis.Redis, recorder: CommandRecorder, runner: Runner | None = None
) -> None:
    """Run every recorded command in one script call (through ``runner`` when given, to share
    its round trip). Raises ``redis.RedisError``."""
    if not recorder.commands:
        return
    flat: list[Any] = []
    for command in recorder.commands:
        flat.append(len(command))
        flat.extend(command)
    if runner is None:
        try:
            client.evalsha(SCRIPT_SHA, 0, *flat)
        except redis.exceptions.NoScriptError:
            client.eval(SCRIPT, 0, *flat)  # first use on this server (or after SCRIPT FLUSH)
        return
    call = CommandRecorder()
    call.execute_command("EVALSHA", SCRIPT_SHA, 0, *flat)
    try:
        runner.run(call)
    except redis.exceptions.NoScriptError:
        call = CommandRecorder()
        call.execute_command("EVAL", SCRIPT, 0, *flat)
        runner.run(call)

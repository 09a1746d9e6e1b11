"""The gateway's Redis client on a real Valkey: commands, scripts, pipelining, failures and recovery."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from gateway.stores.resp import Redis, RedisUnavailable, ReplyError, Script, pack


def _run(coroutine):
    return asyncio.run(coroutine)


def test_commands_scripts_and_pipelining(stores):
    async def scenario():
        client = Redis(stores.redis_url)
        assert await client.execute("PING") == b"PONG"
        await client.execute("SET", "resp:test", 41)
        assert await client.execute("INCRBY", "resp:test", 1) == 42
        script = Script("return {tonumber(ARGV[1]) * 2, KEYS[1]}")
        await client.execute("SCRIPT", "FLUSH")  # the first call must load the script itself
        assert await client.run_script(script, ["k"], [21]) == [42, b"k"]
        results = await asyncio.gather(*(client.execute("INCR", "resp:many") for _ in range(500)))
        assert sorted(results)[-1] - sorted(results)[0] == 499  # replies matched to their commands
        with pytest.raises(ReplyError):
            await client.execute("INCR", "resp:not-a-number-" + "x", "extra-argument")
        await client.close()

    _run(scenario())


def test_redis_restart_is_an_error_then_a_fresh_connection(stores):
    async def scenario():
        client = Redis(stores.redis_url)
        assert await client.execute("PING") == b"PONG"
        await asyncio.to_thread(stores.stop_redis)
        with pytest.raises((RedisUnavailable, ConnectionError)):
            await client.execute("PING")
        await asyncio.to_thread(stores.start_redis)
        assert await client.execute("PING") == b"PONG"
        await client.close()

    _run(scenario())


def test_a_server_that_never_answers_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()

    async def scenario():
        client = Redis(f"redis://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await client.execute("PING")
        assert time.monotonic() - started < 2.0

    _run(scenario())
    listener.close()


def test_a_command_nobody_waits_for_goes_out_with_the_turns_others_and_is_not_lost_at_close(stores):
    """A settle (run_packed_nowait) shares the write of the commands sent in the same turn of the event loop;
    closing the client sends it all the same."""
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")

    async def scenario():
        client = Redis(stores.redis_url)
        await client.execute("DEL", "resp:deferred")
        await client.run_script(script, ["resp:deferred"], [0])  # loaded: the nowait path needs no reload
        errors: list = []
        command = pack(("EVALSHA", script.sha, 1, "resp:deferred", 5))
        client.run_packed_nowait(script, command, errors.append)
        protocol = client._protocol
        assert protocol.outgoing and protocol._flush_soon  # written at the end of this turn
        assert await client.execute("GET", "resp:deferred") == b"5"  # went out first, in the same write
        client.run_packed_nowait(script, command, errors.append)
        await client.close()  # at once: the queued command is sent before the connection closes
        other = Redis(stores.redis_url)
        assert await other.execute("GET", "resp:deferred") == b"10"
        await other.close()
        assert errors == []

    _run(scenario())

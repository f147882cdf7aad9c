#!/usr/bin/env python3
"""Steady traffic to many services: one kept-alive HTTP/1.1 connection per URL, one GET
every INTERVAL seconds on each, for DURATION seconds (bounded in count and time).
Prints one JSON line: requests sent, answered 200, other statuses, errors.

    steady.py URLS_FILE INTERVAL DURATION
"""
import asyncio
import json
import random
import signal
import sys
import time
from urllib.parse import urlsplit


async def one(url, interval, end, counts):
    u = urlsplit(url)
    host, port = u.hostname, u.port or 80
    await asyncio.sleep(random.uniform(0, interval))
    reader = writer = None
    while time.monotonic() < end["at"]:
        t0 = time.monotonic()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: snooze-steady\r\n\r\n".encode())
            counts["sent"] += 1
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await asyncio.wait_for(reader.readexactly(length), 30)
            counts["ok" if status == 200 else "other"] += 1
        except Exception:
            counts["errors"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
        await asyncio.sleep(max(0.0, min(interval - (time.monotonic() - t0), end["at"] - time.monotonic())))
    if writer is not None:
        writer.close()


async def main():
    urls = [l.strip() for l in open(sys.argv[1]) if l.strip()]
    interval, duration = float(sys.argv[2]), float(sys.argv[3])
    end = {"at": time.monotonic() + duration}
    counts = {"sent": 0, "ok": 0, "other": 0, "errors": 0}
    # SIGTERM ends the run early (each connection finishes its request), summary included.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: end.update(at=0))
    await asyncio.gather(*(one(u, interval, end, counts) for u in urls))
    print(json.dumps({"urls": len(urls), "interval_s": interval, "duration_s": duration, **counts}))


asyncio.run(main())

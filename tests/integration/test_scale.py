"""1000 concurrent sessions through mxproxy to smtp-sink; no fd leak afterwards."""

import asyncio
import time

import mxtest
from mxtest import HOST, SINK_GREETING, SINK_BYE, config, listener, free_port

N = 1000


async def _open(port, timeout):
    r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    greeting = await asyncio.wait_for(r.readline(), timeout)
    return r, w, greeting


async def _quit(r, w, timeout):
    w.write(b"QUIT\r\n")
    await w.drain()
    bye = await asyncio.wait_for(r.readline(), timeout)
    w.close()
    await w.wait_closed()
    return bye


async def _run(port, n, timeout):
    # All n sessions are open at once before any of them quits.
    opened = await asyncio.gather(*[_open(port, timeout) for _ in range(n)],
                                  return_exceptions=True)
    errors = [o for o in opened if isinstance(o, BaseException)]
    ok = [o for o in opened if not isinstance(o, BaseException)]
    greetings = [g for _, _, g in ok]
    local_ports = [w.get_extra_info("sockname")[1] for _, w, _ in ok]
    byes = await asyncio.gather(*[_quit(r, w, timeout) for r, w, _ in ok],
                                return_exceptions=True)
    return errors, greetings, byes, local_ports


class ScaleTest(mxtest.ProxyTestCase):

    def test_1000_concurrent_sessions_and_no_fd_leak(self):
        self.assertGreaterEqual(mxtest.raise_nofile(), 3 * N, "RLIMIT_NOFILE too low")
        sink = self.sink(max_conns=2 * N, backlog=2 * N)
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), sink.addr),
                                    workers=2),
                             preexec_fn=mxtest._preexec_nofile)
        # Warm up once so lazily created descriptors are in the baseline.
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), SINK_GREETING)
        sid = p.sid_of(c)
        c.close()
        p.close_of(sid)
        # ev=close is written before the sockets are closed: wait until the
        # count has stayed put for 0.3 s.
        baseline, since = p.fd_count(), time.monotonic()
        deadline = since + 5
        while time.monotonic() - since < 0.3:
            self.assertLess(time.monotonic(), deadline, "fd count never settled")
            time.sleep(0.02)
            n = p.fd_count()
            if n != baseline:
                baseline, since = n, time.monotonic()

        t0 = time.monotonic()
        errors, greetings, byes, local_ports = asyncio.run(_run(port, N, 30))
        elapsed = time.monotonic() - t0
        self.assertEqual(errors, [], "%d sessions failed" % len(errors))
        self.assertEqual(greetings, [SINK_GREETING] * N)
        self.assertEqual(byes, [SINK_BYE] * N)
        print("  %d sessions in %.2fs" % (N, elapsed))

        closes = p.wait_count(N + 1, timeout=20, ev="close")
        opens = {e["client"]: e["sid"] for e in p.find(ev="open")}
        by_sid = {e["sid"]: e for e in closes}
        for lp in local_ports:
            e = by_sid[opens["%s:%d" % (HOST, lp)]]
            self.assertIn(e["end"], ("client_eof", "backend_closed"), e["_raw"])
            self.assertEqual((e["bytes_up"], e["bytes_down"]),
                             ("6", str(len(SINK_GREETING) + len(SINK_BYE))), e["_raw"])
        deadline = time.monotonic() + 10
        while p.fd_count() != baseline:
            self.assertLess(time.monotonic(), deadline,
                            "mxproxy holds %d fds, %d before the sessions"
                            % (p.fd_count(), baseline))
            time.sleep(0.05)


if __name__ == "__main__":
    mxtest.main()

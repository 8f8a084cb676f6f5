"""Backend selection: round robin, failover to the next backend, all down."""

import time

import mxtest
from mxtest import HOST, config, listener, free_port


class BackendsTest(mxtest.ProxyTestCase):

    def proxy_to(self, backends, **opts):
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), backends, **opts)))
        return p, port

    def test_all_backends_down(self):
        dead1, dead2 = "%s:%d" % (HOST, free_port()), "%s:%d" % (HOST, free_port())
        p, port = self.proxy_to([dead1, dead2])
        c = self.client(port)
        how, got = c.wait_closed(1.0)
        self.assertEqual(got, b"", "no bytes may reach the client")
        sid = p.sid_of(c)
        close = p.close_of(sid)
        self.assertEqual(close["end"], "connect_failed")
        self.assertEqual((close["bytes_up"], close["bytes_down"]), ("0", "0"))
        self.assertEqual(close["error"], "connection refused")
        self.assertNotIn("backend", close)
        errors = p.find(ev="connect_error", sid=sid)
        self.assertEqual(len(errors), 2, errors)
        self.assertEqual(sorted(e["backend"] for e in errors), sorted([dead1, dead2]))
        for e in errors:
            self.assertEqual(e["lvl"], "warn")
            self.assertEqual(e["error"], "connection refused")
        self.assertEqual(p.find(ev="connect", sid=sid), [])
        # logged before the close line
        self.assertLess(p.events.index(errors[-1]), p.events.index(close))

    def test_dead_then_live_every_session_reaches_live(self):
        dead = "%s:%d" % (HOST, free_port())
        live = self.smtp_backend("live")
        p, port = self.proxy_to([dead, live.addr], fail_timeout=0)
        for i in range(10):
            c = self.client(port)
            self.assertEqual(c.recv_until(b"\r\n", timeout=2), b"220 live ESMTP\r\n",
                             "session %d" % i)
            self.assertLess(time.monotonic() - c.t_connected, 0.5, "failover must be at once")
            self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 live bye\r\n")
            sid = p.sid_of(c)
            c.close()
            self.assertEqual(p.close_of(sid)["end"], "client_eof")
            self.assertEqual(p.wait_event(ev="connect", sid=sid)["backend"], live.addr)
        self.assertEqual(len(live.conns), 10)
        # Round robin starts every other session at the dead one, which (with
        # fail_timeout=0) is tried each time and fails over at once.
        errors = p.find(ev="connect_error")
        self.assertEqual(len(errors), 5, [e["_raw"] for e in errors])
        for e in errors:
            self.assertEqual((e["backend"], e["error"]), (dead, "connection refused"))
        self.assertEqual(p.find(ev="backend_down"), [])

    def test_fail_timeout_skips_a_failed_backend(self):
        dead = "%s:%d" % (HOST, free_port())
        live = self.smtp_backend("live")
        p, port = self.proxy_to([dead, live.addr], fail_timeout="1s")

        def sessions(n):
            for i in range(n):
                c = self.client(port)
                self.assertEqual(c.recv_until(b"\r\n", timeout=2), b"220 live ESMTP\r\n")
                sid = p.sid_of(c)
                c.close()
                p.close_of(sid)

        t0 = time.monotonic()
        sessions(6)
        self.assertLess(time.monotonic() - t0, 0.9, "too slow to stay within fail_timeout")
        errors = p.find(ev="connect_error")
        self.assertEqual(len(errors), 1, "a failed backend is tried again within fail_timeout")
        down = p.find(ev="backend_down")
        self.assertEqual(len(down), 1)
        self.assertEqual((down[0]["lvl"], down[0]["listener"], down[0]["backend"],
                          down[0]["for_ms"]), ("warn", "smtp", dead, "1000"))
        # After fail_timeout the dead backend gets its turn again.
        time.sleep(max(0.0, 1.1 - (time.monotonic() - down[0]["_t"])))
        sessions(2)
        self.assertEqual(len(p.find(ev="connect_error")), 2)
        self.assertEqual(len(p.find(ev="backend_down")), 2)
        self.assertEqual(len(live.conns), 8)

    def test_round_robin_alternates(self):
        b1 = self.smtp_backend("one")
        b2 = self.smtp_backend("two")
        p, port = self.proxy_to([b1.addr, b2.addr])
        seen = []
        for i in range(10):
            c = self.client(port)
            seen.append(c.recv_until(b"\r\n", timeout=2))
            sid = p.sid_of(c)
            c.close()
            p.close_of(sid)
        names = [g.split()[1].decode() for g in seen]
        self.assertEqual(names.count("one"), 5, names)
        self.assertEqual(names.count("two"), 5, names)
        for a, b in zip(names, names[1:]):
            self.assertNotEqual(a, b, "not alternating: %s" % names)
        self.assertEqual((len(b1.conns), len(b2.conns)), (5, 5))


if __name__ == "__main__":
    mxtest.main()

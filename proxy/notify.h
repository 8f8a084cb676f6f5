/* notify.h: readiness and state changes for the service manager.
 *
 * systemd's sd_notify(3) protocol, written out rather than taken from
 * libsystemd: the service manager puts the path of an AF_UNIX datagram
 * socket in NOTIFY_SOCKET ("/run/..." for a file, "@name" for the abstract
 * namespace) and reads one datagram per state change, made of VAR=VALUE
 * lines. Without NOTIFY_SOCKET (a terminal, a container, Kubernetes) every
 * call does nothing. No libuv types; the send never blocks.
 */
#ifndef MXPROXY_NOTIFY_H
#define MXPROXY_NOTIFY_H

#include <stddef.h>

enum notify_state {
    NOTIFY_READY = 0, /* "READY=1": every listener is bound, or a reload is done */
    NOTIFY_RELOADING, /* "RELOADING=1\nMONOTONIC_USEC=N": SIGHUP taken */
    NOTIFY_STOPPING,  /* "STOPPING=1": the drain began */
};

/* Writes the datagram for state s into buf (cap bytes, NUL-terminated);
 * RELOADING carries CLOCK_MONOTONIC now, in microseconds, as systemd asks.
 * Returns its length, not counting the NUL. */
size_t notify_format(enum notify_state s, char *buf, size_t cap);

/* Sends state s to the socket named by NOTIFY_SOCKET, if any. Returns 0
 * (sent, or no NOTIFY_SOCKET) or a negative errno: -EAFNOSUPPORT for an
 * address that is neither "/path" nor "@name" (e.g. systemd's vsock form),
 * -EAGAIN when the manager's queue is full, the socket's errors otherwise.
 * Reads the environment: call it from the main thread only. */
int notify_send(enum notify_state s);

#endif /* MXPROXY_NOTIFY_H */

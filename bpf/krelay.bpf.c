/* krelay.bpf.c: the sockmap relay's stream verdict.
 *
 * Two maps, so that no socket runs the verdict before its peer can be
 * found: krelay_peers holds each socket of a pair under its peer's cookie
 * (the redirect targets; no program attached, joining it changes nothing
 * for the socket), krelay_active holds each socket under its own cookie and
 * carries the verdict. mxproxy fills krelay_peers first. The program looks
 * up its own cookie in krelay_peers and hands the bytes straight to that
 * socket's send path; user space sees neither the bytes nor a wake-up for
 * them. */
#include <linux/bpf.h> /* first: the helpers need its types */

#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, __u64);   /* the cookie of the socket whose bytes come in */
    __type(value, __u64); /* the socket they go out on */
} krelay_peers SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, __u64);   /* a socket's own cookie */
    __type(value, __u64); /* the socket: the verdict runs on what it receives */
} krelay_active SEC(".maps");

SEC("sk_skb/stream_verdict")
int krelay_verdict(struct __sk_buff *skb)
{
    __u64 self;

    /* A FIN alone comes as an empty skb. The kernel's backlog takes a send
     * of nothing for a hard error: redirected, the empty skb breaks the
     * peer's relay (EPIPE); passed to this socket while the peer's bytes
     * still queue for it, it breaks this one's the same way. The FIN is in
     * the TCP state already (the reader sees EOF): the empty skb goes. */
    if (skb->len == 0)
        return SK_DROP;
    self = bpf_get_socket_cookie(skb);
    /* No peer (it was closed and left the map): the bytes are dropped, as
     * a write to a closed socket would fail; the session is ending. */
    return bpf_sk_redirect_hash(skb, &krelay_peers, &self, 0);
}

char LICENSE[] SEC("license") = "GPL";

/* notify.c: sd_notify(3) datagrams; see notify.h. */
#include "notify.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

size_t notify_format(enum notify_state s, char *buf, size_t cap)
{
    struct timespec now;
    int n;

    switch (s) {
    case NOTIFY_READY:
        n = snprintf(buf, cap, "READY=1");
        break;
    case NOTIFY_RELOADING:
        /* systemd pairs a reload with the READY=1 that ends it by this
         * stamp (Type=notify-reload requires it; older managers ignore it). */
        clock_gettime(CLOCK_MONOTONIC, &now);
        n = snprintf(buf, cap, "RELOADING=1\nMONOTONIC_USEC=%llu",
                     (unsigned long long)now.tv_sec * 1000000u +
                         (unsigned long long)now.tv_nsec / 1000u);
        break;
    case NOTIFY_STOPPING:
        n = snprintf(buf, cap, "STOPPING=1");
        break;
    default:
        abort();
    }
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

int notify_send(enum notify_state s)
{
    const char *path = getenv("NOTIFY_SOCKET"); /* main thread only: see notify.h */
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    char msg[64];
    size_t path_len, len;
    socklen_t sa_len;
    ssize_t sent;
    int fd, rc = 0;

    if (path == NULL || path[0] == '\0')
        return 0;
    path_len = strlen(path);
    if ((path[0] != '/' && path[0] != '@') || path_len < 2 || path_len >= sizeof(sun.sun_path))
        return -EAFNOSUPPORT;
    memcpy(sun.sun_path, path, path_len);
    /* An abstract address is the name after a NUL, and its length is exact:
     * no terminating NUL may be counted. */
    if (path[0] == '@')
        sun.sun_path[0] = '\0';
    sa_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len);

    len = notify_format(s, msg, sizeof(msg));
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* MSG_DONTWAIT: a manager that does not read must not stall the main
     * loop, which also serves signals and the admin endpoint. */
    sent = sendto(fd, msg, len, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)&sun, sa_len);
    if (sent < 0)
        rc = -errno;
    else if ((size_t)sent != len)
        rc = -EMSGSIZE;
    close(fd);
    return rc;
}

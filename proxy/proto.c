/* proto.c: the table of protocol-aware modes. */
#include "proto.h"

#include <stddef.h>

#include "dialog.h"

/* The one table a new protocol adds a row to; mode tcp has none. */
static const struct proto *const proto_by_mode[] = {
    [CONFIG_MODE_TCP] = NULL,
    [CONFIG_MODE_SMTP] = &proto_smtp,
    [CONFIG_MODE_POP3] = &proto_pop3,
    [CONFIG_MODE_IMAP] = &proto_imap,
};

const struct proto *proto_for_mode(enum config_mode mode)
{
    if ((size_t)mode >= sizeof(proto_by_mode) / sizeof(proto_by_mode[0]))
        return NULL;
    return proto_by_mode[mode];
}

void proto_pool_drain(struct worker *w)
{
    dialog_pool_drain(w);
}

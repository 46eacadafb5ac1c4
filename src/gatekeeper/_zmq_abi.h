/*
 * The slice of the libzmq ABI the data plane uses, declared here so that the build needs
 * no libzmq headers and links no libzmq: the functions are resolved at import time from
 * the libzmq that pyzmq has already loaded, so the process holds exactly one libzmq and
 * sockets can be shared with pyzmq.
 *
 * The values below are part of libzmq's stable ABI (zmq.h, unchanged since 4.0).
 */
#ifndef GATEKEEPER_ZMQ_ABI_H
#define GATEKEEPER_ZMQ_ABI_H

#include <stddef.h>
#include <string.h>
#include <errno.h>

#include "_dlresolve.h"

/* zmq_msg_t is an opaque 64-byte block, pointer-aligned (zmq.h). */
typedef struct gk_zmq_msg_t {
    union { unsigned char bytes[64]; void *align_; } u;
} gk_zmq_msg_t;

typedef struct gk_zmq_pollitem_t {
    void *socket;
    int fd;
    short events;
    short revents;
} gk_zmq_pollitem_t;

#define GK_ZMQ_POLLIN 1
#define GK_ZMQ_POLLOUT 2
#define GK_ZMQ_DONTWAIT 1
#define GK_ZMQ_SNDMORE 2
#define GK_ZMQ_FD 14
#define GK_ZMQ_EVENTS 15
#define GK_ZMQ_HAUSNUMERO 156384712
#define GK_ETERM (GK_ZMQ_HAUSNUMERO + 53)

typedef struct gk_zmq_api {
    int (*msg_init)(gk_zmq_msg_t *);
    int (*msg_init_size)(gk_zmq_msg_t *, size_t);
    int (*msg_close)(gk_zmq_msg_t *);
    int (*msg_recv)(gk_zmq_msg_t *, void *, int);
    int (*msg_send)(gk_zmq_msg_t *, void *, int);
    int (*msg_more)(const gk_zmq_msg_t *);
    size_t (*msg_size)(const gk_zmq_msg_t *);
    void *(*msg_data)(gk_zmq_msg_t *);
    const char *(*msg_gets)(const gk_zmq_msg_t *, const char *);
    int (*send)(void *, const void *, size_t, int);
    int (*poll)(gk_zmq_pollitem_t *, int, long);
    int (*getsockopt)(void *, int, void *, size_t *);
    int (*errno_)(void);
} gk_zmq_api;

/*
 * Fill `api` from the shared object at `path` (pyzmq's backend module), whose
 * dependencies hold pyzmq's libzmq: never a second libzmq. Returns NULL on success or the
 * name of the first symbol that could not be resolved ("dlopen" when the object is not
 * loaded).
 */
static const char *gk_zmq_resolve(const char *path, gk_zmq_api *api) {
    void *h = gk_dlopen_loaded(path);
    if (h == NULL) {
        return "dlopen";
    }
    GK_RESOLVE(h, api->msg_init, "zmq_msg_init");
    GK_RESOLVE(h, api->msg_init_size, "zmq_msg_init_size");
    GK_RESOLVE(h, api->msg_close, "zmq_msg_close");
    GK_RESOLVE(h, api->msg_recv, "zmq_msg_recv");
    GK_RESOLVE(h, api->msg_send, "zmq_msg_send");
    GK_RESOLVE(h, api->msg_more, "zmq_msg_more");
    GK_RESOLVE(h, api->msg_size, "zmq_msg_size");
    GK_RESOLVE(h, api->msg_data, "zmq_msg_data");
    GK_RESOLVE(h, api->msg_gets, "zmq_msg_gets");
    GK_RESOLVE(h, api->send, "zmq_send");
    GK_RESOLVE(h, api->poll, "zmq_poll");
    GK_RESOLVE(h, api->getsockopt, "zmq_getsockopt");
    GK_RESOLVE(h, api->errno_, "zmq_errno");
    return NULL;
}

#endif

# The libzmq ABI slice of _zmq_abi.h, for every Cython module that calls libzmq directly
# (the data plane, and bench/'s load generator): declared once.

cdef extern from "_zmq_abi.h" nogil:
    ctypedef struct gk_zmq_msg_t:
        pass
    ctypedef struct gk_zmq_pollitem_t:
        void *socket
        int fd
        short events
        short revents
    ctypedef struct gk_zmq_api:
        int (*msg_init)(gk_zmq_msg_t *) noexcept nogil
        int (*msg_init_size)(gk_zmq_msg_t *, size_t) noexcept nogil
        int (*msg_close)(gk_zmq_msg_t *) noexcept nogil
        int (*msg_recv)(gk_zmq_msg_t *, void *, int) noexcept nogil
        int (*msg_send)(gk_zmq_msg_t *, void *, int) noexcept nogil
        int (*msg_more)(const gk_zmq_msg_t *) noexcept nogil
        size_t (*msg_size)(const gk_zmq_msg_t *) noexcept nogil
        void *(*msg_data)(gk_zmq_msg_t *) noexcept nogil
        const char *(*msg_gets)(const gk_zmq_msg_t *, const char *) noexcept nogil
        int (*send)(void *, const void *, size_t, int) noexcept nogil
        int (*poll)(gk_zmq_pollitem_t *, int, long) noexcept nogil
        int (*getsockopt)(void *, int, void *, size_t *) noexcept nogil
        int (*errno_ "errno_")() noexcept nogil
    const char *gk_zmq_resolve(const char *path, gk_zmq_api *api)
    enum:
        GK_ZMQ_POLLIN
        GK_ZMQ_POLLOUT
        GK_ZMQ_DONTWAIT
        GK_ZMQ_SNDMORE
        GK_ZMQ_FD
        GK_ZMQ_EVENTS

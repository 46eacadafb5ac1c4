/*
 * A CURVE server linked against the system's libzmq (Debian's 4.3.4 with its own
 * libsodium: a second, independent build from pyzmq's), for tests/test_curve_client.py
 * and tests/test_brokers.py: a ROUTER bound to ENDPOINT that echoes COUNT messages to
 * whoever sent them.
 *
 *     curve_server ENDPOINT SECRET_KEY_Z85 COUNT
 *
 * First line "libzmq X.Y.Z", once bound; last line "ok COUNT", exit 0; or says what
 * failed and exits 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <zmq.h>

#define MAX_FRAMES 16

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, zmq_strerror(zmq_errno()));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ENDPOINT SECRET_KEY_Z85 COUNT\n", argv[0]);
        return 2;
    }
    int count = atoi(argv[3]);
    int major, minor, patch, yes = 1, timeout = 10000, linger = 0;
    zmq_version(&major, &minor, &patch);
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_ROUTER);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_setsockopt(s, ZMQ_CURVE_SERVER, &yes, sizeof yes) != 0
            || zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, argv[2], 40) != 0)
        return fail("curve keys");
    if (zmq_bind(s, argv[1]) != 0)
        return fail("bind");
    printf("libzmq %d.%d.%d\n", major, minor, patch);
    fflush(stdout);
    for (int i = 0; i < count; i++) {
        zmq_msg_t frames[MAX_FRAMES];
        int n = 0, more = 1;
        while (more) {
            if (n == MAX_FRAMES)
                return fail("too many frames");
            zmq_msg_init(&frames[n]);
            if (zmq_msg_recv(&frames[n], s, 0) < 0)
                return fail("receive");
            more = zmq_msg_more(&frames[n]);
            n++;
        }
        for (int f = 0; f < n; f++)
            if (zmq_msg_send(&frames[f], s, f < n - 1 ? ZMQ_SNDMORE : 0) < 0)
                return fail("send");
    }
    printf("ok %d\n", count);
    zmq_close(s);
    zmq_ctx_term(ctx);
    return 0;
}

/*
 * A client linked against the system's libzmq (Debian's 4.3.4: a second, independent
 * build from pyzmq's), for tests/test_interop.py: N requests through the gatekeeper to an
 * echo broker, each checked against its reply.
 *
 *     echo_client ENDPOINT dealer|req COUNT [IDENTITY]
 *
 * Prints "libzmq X.Y.Z ok COUNT" and exits 0, or names the first mismatch and exits 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, zmq_strerror(zmq_errno()));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ENDPOINT dealer|req COUNT [IDENTITY]\n", argv[0]);
        return 2;
    }
    int req = strcmp(argv[2], "req") == 0;
    int count = atoi(argv[3]);
    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, req ? ZMQ_REQ : ZMQ_DEALER);
    int timeout = 5000, linger = 0;
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    if (argc > 4 && zmq_setsockopt(s, ZMQ_ROUTING_ID, argv[4], strlen(argv[4])) != 0)
        return fail("routing id");
    if (zmq_connect(s, argv[1]) != 0)
        return fail("connect");
    char body[300], got[300];
    for (int i = 0; i < count; i++) {
        /* a body of its own size and content each time, across the long-frame boundary */
        int size = snprintf(body, sizeof body, "request %d ", i);
        while (size < 10 + i % 280)
            body[size++] = (char)('a' + i % 26);
        if (!req && zmq_send(s, "", 0, ZMQ_SNDMORE) != 0)
            return fail("send delimiter");
        if (zmq_send(s, body, size, 0) != size)
            return fail("send");
        if (!req && zmq_recv(s, got, sizeof got, 0) != 0)
            return fail("receive delimiter");
        int n = zmq_recv(s, got, sizeof got, 0);
        if (n != size || memcmp(got, body, size) != 0) {
            fprintf(stderr, "reply %d is not its request (%d bytes)\n", i, n);
            return n < 0 ? fail("receive") : 1;
        }
    }
    printf("libzmq %d.%d.%d ok %d\n", major, minor, patch, count);
    zmq_close(s);
    zmq_ctx_term(ctx);
    return 0;
}

/*
 * A CURVE client linked against the system's libzmq (Debian's 4.3.4 with its own
 * libsodium: a second, independent build from pyzmq's), for tests/test_curve_codec.py: a
 * fresh key pair, COUNT three-frame requests over a DEALER, each checked against its echo.
 *
 *     curve_client ENDPOINT SERVER_KEY_Z85 COUNT
 *
 * First line "libzmq X.Y.Z PUBLIC_KEY_Z85", last line "ok COUNT", exit 0; or names the
 * first mismatch and exits 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define FRAMES 3

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, zmq_strerror(zmq_errno()));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ENDPOINT SERVER_KEY_Z85 COUNT\n", argv[0]);
        return 2;
    }
    int count = atoi(argv[3]);
    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    char public_key[41], secret_key[41];
    if (zmq_curve_keypair(public_key, secret_key) != 0)
        return fail("curve keypair (a libzmq without CURVE?)");
    printf("libzmq %d.%d.%d %s\n", major, minor, patch, public_key);
    fflush(stdout);

    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int timeout = 5000, linger = 0;
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, argv[2], 40) != 0
            || zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, public_key, 40) != 0
            || zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, secret_key, 40) != 0)
        return fail("curve keys");
    if (zmq_connect(s, argv[1]) != 0)
        return fail("connect");
    char frames[FRAMES][300], got[300];
    int sizes[FRAMES];
    for (int i = 0; i < count; i++) {
        /* an empty delimiter, a numbered frame, a body across the long-frame boundary */
        sizes[0] = 0;
        sizes[1] = snprintf(frames[1], sizeof frames[1], "request %d", i);
        sizes[2] = 1 + i % 290;
        memset(frames[2], 'a' + i % 26, sizes[2]);
        for (int f = 0; f < FRAMES; f++)
            if (zmq_send(s, frames[f], sizes[f], f < FRAMES - 1 ? ZMQ_SNDMORE : 0) != sizes[f])
                return fail("send");
        for (int f = 0; f < FRAMES; f++) {
            int n = zmq_recv(s, got, sizeof got, 0);
            if (n < 0)
                return fail("receive");
            int more = 0;
            size_t more_size = sizeof more;
            zmq_getsockopt(s, ZMQ_RCVMORE, &more, &more_size);
            if (n != sizes[f] || memcmp(got, frames[f], n) != 0 || more != (f < FRAMES - 1)) {
                fprintf(stderr, "reply %d frame %d is not its request (%d bytes)\n", i, f, n);
                return 1;
            }
        }
    }
    printf("ok %d\n", count);
    zmq_close(s);
    zmq_ctx_term(ctx);
    return 0;
}

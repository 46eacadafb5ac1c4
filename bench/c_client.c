/*
 * The C load client of bench/e2e.py (--client c), linked against the system's libzmq
 * (Debian's libzmq3-dev, 4.3.4): a second, independent libzmq build from pyzmq's, so the
 * numbers do not hinge on the one libzmq the proxy and the Cython generator share.
 *
 *     c_client [options] ENDPOINT
 *     c_client --version        prints "libzmq X.Y.Z", the libzmq it runs on
 *       --identity ID       one DEALER per --identity (its routing id), at least one
 *       --depth D           requests in flight per DEALER (1)
 *       --size B            request bytes, >= 16 (64)
 *       --warmup S          unmeasured seconds first (0.5)
 *       --seconds S         the measured window (3)
 *       --drain S           after the window: seconds to wait for the replies in flight (2)
 *       --max-requests N    end the window after N measured replies; 0: no limit (0)
 *       --sample-cap N      latencies kept, a reservoir sample beyond that (262144)
 *       --curve-server K --curve-public K --curve-secret K
 *                           CURVE client keys (Z85, 40 characters each)
 *
 * Every request is one frame: the DEALER's index (u32), a slot (u32), a sequence number
 * (u64), then bytes that follow from the three. Each DEALER keeps D slots, one request
 * in flight in each with its send time; a reply counts only if it is, byte for byte, the
 * request its slot holds, so a lost, duplicated, corrupted or misrouted reply cannot pass
 * for another one, in whatever order the replies come.
 *
 * Prints one JSON line and exits 0 when the run ran (the caller judges its counts), 1 on
 * a libzmq error, 2 on bad usage. Counts: sent; received (own replies in the window),
 * received_total (own replies in all); bad (replies that are not one frame of the
 * request's size: a gatekeeper's refusal, [GATEKEEPER, reason]); mismatched (one frame of
 * the right size that is no request in flight on that DEALER); lost (requests never
 * answered by their own reply: sent - received_total).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#define HEADER 16
/* Replies taken from one DEALER before polling again: batching is what keeps the client
 * cheap, the bound keeps one busy socket from starving the others (as _loadgen.pyx). */
#define RECV_BURST 256
/* Poll timeout: phase deadlines are met within a few ms. */
#define POLL_MS 5
#define MAX_CONNECTIONS 1024

enum phase { WARMUP, MEASURE, DRAIN };

struct slot {
    uint64_t seq;
    int64_t sent_ns;
    int busy;
};

struct conn {
    void *sock;
    struct slot *slots;
    int *free_slots; /* a stack of the slots with nothing in flight */
    int nfree;
    uint64_t next_seq;
};

struct run {
    struct conn *conns;
    zmq_pollitem_t *items;
    int nconn, depth;
    size_t size;
    unsigned char *payload, *expected;
    /* Reservoir sample of latencies: memory is fixed whatever the rate or duration. */
    int64_t *samples;
    size_t cap, nsamples;
    uint64_t seen, rng;
    uint64_t sent, received, window_received, bad, mismatched;
};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t next_random(struct run *r) {
    /* xorshift64*: plenty for reservoir sampling */
    r->rng ^= r->rng >> 12;
    r->rng ^= r->rng << 25;
    r->rng ^= r->rng >> 27;
    return r->rng * UINT64_C(2685821657736338717);
}

static void record(struct run *r, int64_t latency) {
    r->seen++;
    if (r->nsamples < r->cap) {
        r->samples[r->nsamples++] = latency;
    } else {
        uint64_t j = next_random(r) % r->seen;
        if (j < r->cap)
            r->samples[j] = latency;
    }
}

/* The whole request for (conn, slot, seq): any byte out of place in a reply shows. */
static void fill(unsigned char *p, size_t size, uint32_t conn, uint32_t slot, uint64_t seq) {
    memcpy(p, &conn, 4);
    memcpy(p + 4, &slot, 4);
    memcpy(p + 8, &seq, 8);
    for (size_t i = HEADER; i < size; i++)
        p[i] = (unsigned char)(seq * 131 + i * 7 + conn);
}

static int fail(const char *what) {
    fprintf(stderr, "c_client: %s: %s\n", what, zmq_strerror(zmq_errno()));
    return 1;
}

/* Top DEALER i up to depth requests in flight; -1 on a hard error. */
static int send_burst(struct run *r, int i) {
    struct conn *c = &r->conns[i];
    while (c->nfree > 0) {
        int slot = c->free_slots[c->nfree - 1];
        uint64_t seq = c->next_seq;
        fill(r->payload, r->size, (uint32_t)i, (uint32_t)slot, seq);
        int64_t t = now_ns();
        if (zmq_send(c->sock, r->payload, r->size, ZMQ_DONTWAIT) < 0)
            return zmq_errno() == EAGAIN ? 0 : -1; /* at the HWM: the next round retries */
        c->nfree--;
        c->next_seq++;
        c->slots[slot] = (struct slot){.seq = seq, .sent_ns = t, .busy = 1};
        r->sent++;
    }
    return 0;
}

/* The slot a reply of the request's size answers, or -1 if it is no request in flight
 * on DEALER i. */
static int match(struct run *r, int i, const unsigned char *got) {
    uint32_t conn, slot;
    uint64_t seq;
    memcpy(&conn, got, 4);
    memcpy(&slot, got + 4, 4);
    memcpy(&seq, got + 8, 8);
    if (conn != (uint32_t)i || slot >= (uint32_t)r->depth)
        return -1;
    struct slot *s = &r->conns[i].slots[slot];
    if (!s->busy || s->seq != seq)
        return -1;
    fill(r->expected, r->size, conn, slot, seq);
    return memcmp(got, r->expected, r->size) == 0 ? (int)slot : -1;
}

/* Take up to RECV_BURST replies from DEALER i; -1 on a hard error. */
static int recv_burst(struct run *r, int i, int measuring) {
    struct conn *c = &r->conns[i];
    zmq_msg_t msg;
    for (int n = 0; n < RECV_BURST; n++) {
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            return zmq_errno() == EAGAIN ? 0 : -1;
        }
        int more = zmq_msg_more(&msg);
        int whole = zmq_msg_size(&msg) == r->size && !more;
        int slot = whole ? match(r, i, zmq_msg_data(&msg)) : -1;
        while (more) { /* a message arrives whole: the rest of it is already here */
            zmq_msg_close(&msg);
            zmq_msg_init(&msg);
            if (zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&msg);
                return -1;
            }
            more = zmq_msg_more(&msg);
        }
        zmq_msg_close(&msg);
        if (!whole || slot < 0) {
            if (whole)
                r->mismatched++;
            else
                r->bad++;
            continue;
        }
        struct slot *s = &c->slots[slot];
        s->busy = 0;
        c->free_slots[c->nfree++] = slot;
        r->received++;
        if (measuring) {
            r->window_received++;
            record(r, now_ns() - s->sent_ns);
        }
    }
    return 0;
}

static int compare_int64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int in_flight(const struct run *r) {
    int n = 0;
    for (int i = 0; i < r->nconn; i++)
        n += r->depth - r->conns[i].nfree;
    return n;
}

static void print_percentile(const char *name, const struct run *r, int percent) {
    if (r->nsamples)
        printf(", \"%s\": %.3f", name, r->samples[(r->nsamples - 1) * percent / 100] / 1e3);
    else
        printf(", \"%s\": null", name);
}

static int usage(const char *argv0, const char *why) {
    fprintf(stderr, "c_client: %s\nusage: %s --identity ID [--identity ID ...] [--depth D] "
            "[--size B] [--warmup S] [--seconds S] [--drain S] [--max-requests N] "
            "[--sample-cap N] [--curve-server K --curve-public K --curve-secret K] "
            "ENDPOINT\n", why, argv0);
    return 2;
}

int main(int argc, char **argv) {
#ifdef __linux__
    /* e2e.py may die by SIGKILL: the client must not load a port someone reuses */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
    static const struct option options[] = {
        {"identity", required_argument, 0, 'i'},     {"depth", required_argument, 0, 'd'},
        {"size", required_argument, 0, 'b'},         {"warmup", required_argument, 0, 'w'},
        {"seconds", required_argument, 0, 's'},      {"drain", required_argument, 0, 'D'},
        {"max-requests", required_argument, 0, 'm'}, {"sample-cap", required_argument, 0, 'c'},
        {"curve-server", required_argument, 0, 'S'}, {"curve-public", required_argument, 0, 'P'},
        {"curve-secret", required_argument, 0, 'K'}, {0, 0, 0, 0},
    };
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        int major, minor, patch;
        zmq_version(&major, &minor, &patch);
        printf("libzmq %d.%d.%d\n", major, minor, patch);
        return 0;
    }
    const char *identities[MAX_CONNECTIONS];
    const char *curve[3] = {0, 0, 0}; /* server, public, secret */
    int nconn = 0, depth = 1;
    long size = 64;
    double warmup_s = 0.5, duration_s = 3.0, drain_s = 2.0;
    unsigned long long max_requests = 0, sample_cap = 1 << 18;
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'i':
            if (nconn == MAX_CONNECTIONS)
                return usage(argv[0], "too many --identity");
            identities[nconn++] = optarg;
            break;
        case 'd': depth = atoi(optarg); break;
        case 'b': size = atol(optarg); break;
        case 'w': warmup_s = atof(optarg); break;
        case 's': duration_s = atof(optarg); break;
        case 'D': drain_s = atof(optarg); break;
        case 'm': max_requests = strtoull(optarg, NULL, 10); break;
        case 'c': sample_cap = strtoull(optarg, NULL, 10); break;
        case 'S': curve[0] = optarg; break;
        case 'P': curve[1] = optarg; break;
        case 'K': curve[2] = optarg; break;
        default: return usage(argv[0], "unknown option");
        }
    }
    if (optind != argc - 1)
        return usage(argv[0], "one ENDPOINT");
    if (nconn < 1 || depth < 1 || size < HEADER)
        return usage(argv[0], "need an --identity, --depth >= 1 and --size >= 16");
    int curve_keys = !!curve[0] + !!curve[1] + !!curve[2];
    if (curve_keys != 0 && curve_keys != 3)
        return usage(argv[0], "CURVE needs all of --curve-server, --curve-public, --curve-secret");

    struct run r = {.nconn = nconn, .depth = depth, .size = (size_t)size,
                    .cap = sample_cap ? sample_cap : 1, .rng = UINT64_C(0x9E3779B97F4A7C15)};
    r.conns = calloc(nconn, sizeof *r.conns);
    r.items = calloc(nconn, sizeof *r.items);
    r.payload = malloc(r.size);
    r.expected = malloc(r.size);
    r.samples = malloc(r.cap * sizeof *r.samples);
    if (!r.conns || !r.items || !r.payload || !r.expected || !r.samples) {
        fprintf(stderr, "c_client: out of memory\n");
        return 1;
    }
    void *ctx = zmq_ctx_new();
    /* The generator, not its own queues, bounds what is in flight (as loadgen.dealer). */
    int hwm = depth * 2 > 1000 ? depth * 2 : 1000, linger = 0;
    for (int i = 0; i < nconn; i++) {
        struct conn *c = &r.conns[i];
        c->slots = calloc(depth, sizeof *c->slots);
        c->free_slots = malloc(depth * sizeof *c->free_slots);
        if (!c->slots || !c->free_slots) {
            fprintf(stderr, "c_client: out of memory\n");
            return 1;
        }
        for (int s = 0; s < depth; s++)
            c->free_slots[s] = depth - 1 - s;
        c->nfree = depth;
        c->sock = zmq_socket(ctx, ZMQ_DEALER);
        zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_setsockopt(c->sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
        zmq_setsockopt(c->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
        if (zmq_setsockopt(c->sock, ZMQ_ROUTING_ID, identities[i], strlen(identities[i])))
            return fail("routing id");
        if (curve_keys && (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, curve[0], 40)
                           || zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, curve[1], 40)
                           || zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, curve[2], 40)))
            return fail("curve keys (Z85, 40 characters each)");
        if (zmq_connect(c->sock, argv[optind]))
            return fail("connect");
        r.items[i] = (zmq_pollitem_t){.socket = c->sock, .events = ZMQ_POLLIN};
    }

    enum phase phase = WARMUP;
    int64_t start = now_ns(), t_start = 0, t_stop = 0, drain_end = 0;
    int64_t warmup_end = start + (int64_t)(warmup_s * 1e9);
    int64_t window_end = warmup_end + (int64_t)(duration_s * 1e9);
    if (warmup_s <= 0) {
        phase = MEASURE;
        t_start = start;
    }
    for (int i = 0; i < nconn; i++)
        if (send_burst(&r, i) < 0)
            return fail("send");
    for (;;) {
        if (zmq_poll(r.items, nconn, POLL_MS) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            return fail("poll");
        }
        for (int i = 0; i < nconn; i++)
            if ((r.items[i].revents & ZMQ_POLLIN) && recv_burst(&r, i, phase == MEASURE) < 0)
                return fail("receive");
        int64_t now = now_ns();
        if (phase == WARMUP && now >= warmup_end) {
            phase = MEASURE;
            t_start = now;
        }
        if (phase == MEASURE
                && (now >= window_end || (max_requests && r.window_received >= max_requests))) {
            phase = DRAIN;
            t_stop = now;
            drain_end = now + (int64_t)(drain_s * 1e9);
        }
        if (phase != DRAIN) {
            for (int i = 0; i < nconn; i++)
                if (send_burst(&r, i) < 0)
                    return fail("send");
        } else if (in_flight(&r) == 0 || now >= drain_end) {
            break;
        }
    }

    qsort(r.samples, r.nsamples, sizeof *r.samples, compare_int64);
    double elapsed = t_stop > t_start ? (t_stop - t_start) / 1e9 : 0.0;
    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    printf("{\"libzmq\": \"%d.%d.%d\", \"sent\": %" PRIu64 ", \"received\": %" PRIu64
           ", \"received_total\": %" PRIu64 ", \"bad\": %" PRIu64 ", \"mismatched\": %" PRIu64
           ", \"lost\": %" PRIu64 ", \"elapsed_s\": %.6f, \"msgs_per_s\": %.1f",
           major, minor, patch, r.sent, r.window_received, r.received, r.bad, r.mismatched,
           r.sent - r.received, elapsed, elapsed > 0 ? r.window_received / elapsed : 0.0);
    print_percentile("p50_us", &r, 50);
    print_percentile("p99_us", &r, 99);
    printf(", \"samples\": %zu}\n", r.nsamples);
    for (int i = 0; i < nconn; i++)
        zmq_close(r.conns[i].sock);
    zmq_ctx_term(ctx);
    return 0;
}

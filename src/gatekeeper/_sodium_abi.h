/*
 * The slice of libsodium that CurveZMQ (_curve) needs, declared here so that the build
 * needs no libsodium headers and links no libsodium: the functions are resolved at
 * import time from the libsodium that pyzmq's libzmq is linked against, the copy libzmq
 * itself encrypts with, so the process holds one libsodium and the package no new
 * dependency.
 *
 * The sizes are libsodium's constants for crypto_box_curve25519xsalsa20poly1305 and
 * crypto_secretbox_xsalsa20poly1305, which CurveZMQ fixes (RFC 26 "Security"). The
 * detached functions seal and open in place (libsodium moves overlapping buffers itself,
 * crypto_secretbox_easy.c), which is what lets _curve work without scratch copies.
 */
#ifndef GATEKEEPER_SODIUM_ABI_H
#define GATEKEEPER_SODIUM_ABI_H

#include <stddef.h>

#include "_dlresolve.h"

/* every key: public, secret, precomputed (beforenm) and secretbox */
#define GK_KEYBYTES 32
#define GK_NONCEBYTES 24
#define GK_MACBYTES 16

typedef unsigned char gk_u8;

typedef struct gk_sodium_api {
    int (*init)(void);
    void (*randombytes_buf)(void *, size_t);
    void (*memzero)(void *, size_t);
    int (*verify_32)(const gk_u8 *, const gk_u8 *);
    int (*scalarmult_base)(gk_u8 *, const gk_u8 *);
    int (*box_keypair)(gk_u8 *, gk_u8 *);
    int (*box_beforenm)(gk_u8 *, const gk_u8 *, const gk_u8 *);
    int (*box_detached_afternm)(gk_u8 *, gk_u8 *, const gk_u8 *, unsigned long long,
                                const gk_u8 *, const gk_u8 *);
    int (*box_open_detached_afternm)(gk_u8 *, const gk_u8 *, const gk_u8 *,
                                     unsigned long long, const gk_u8 *, const gk_u8 *);
    int (*secretbox_detached)(gk_u8 *, gk_u8 *, const gk_u8 *, unsigned long long,
                              const gk_u8 *, const gk_u8 *);
    int (*secretbox_open_detached)(gk_u8 *, const gk_u8 *, const gk_u8 *, unsigned long long,
                                   const gk_u8 *, const gk_u8 *);
} gk_sodium_api;

/*
 * Fill `api` through the shared object at `path` (pyzmq's backend module), as
 * gk_zmq_resolve does for libzmq: libzmq's libsodium is among its dependencies. A libzmq
 * built with tweetnacl exports none of these. Returns NULL on success or the name of the
 * first symbol that could not be resolved ("dlopen" when the object is not loaded).
 */
static const char *gk_sodium_resolve(const char *path, gk_sodium_api *api) {
    void *h = gk_dlopen_loaded(path);
    if (h == NULL) {
        return "dlopen";
    }
    GK_RESOLVE(h, api->init, "sodium_init");
    GK_RESOLVE(h, api->randombytes_buf, "randombytes_buf");
    GK_RESOLVE(h, api->memzero, "sodium_memzero");
    GK_RESOLVE(h, api->verify_32, "crypto_verify_32");
    GK_RESOLVE(h, api->scalarmult_base, "crypto_scalarmult_base");
    GK_RESOLVE(h, api->box_keypair, "crypto_box_keypair");
    GK_RESOLVE(h, api->box_beforenm, "crypto_box_beforenm");
    GK_RESOLVE(h, api->box_detached_afternm, "crypto_box_detached_afternm");
    GK_RESOLVE(h, api->box_open_detached_afternm, "crypto_box_open_detached_afternm");
    GK_RESOLVE(h, api->secretbox_detached, "crypto_secretbox_detached");
    GK_RESOLVE(h, api->secretbox_open_detached, "crypto_secretbox_open_detached");
    return NULL;
}

#endif

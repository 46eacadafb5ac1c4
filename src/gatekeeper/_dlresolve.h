/*
 * Functions resolved at import time through a shared object that is already loaded (a
 * pyzmq backend module), for _zmq_abi.h and _sodium_abi.h. RTLD_NOLOAD, so nothing new is
 * ever loaded; dlsym on that handle searches its dependencies too, which is where the
 * libraries are. The handles stay open for the life of the process, like pyzmq itself.
 */
#ifndef GATEKEEPER_DLRESOLVE_H
#define GATEKEEPER_DLRESOLVE_H

#include <dlfcn.h>

static void *gk_dlopen_loaded(const char *path) {
    return dlopen(path, RTLD_NOW | RTLD_NOLOAD);
}

/* Inside a function that returns the name of the first symbol missing, or NULL. */
#define GK_RESOLVE(handle, slot, name)                 \
    do {                                               \
        *(void **)(&(slot)) = dlsym(handle, name);     \
        if ((slot) == NULL) return name;               \
    } while (0)

#endif

/*
 * minivmm: a tiny "VMM" that migrates a live process's memory through librmig.
 *
 * Run with no arguments (or with a size in MiB), it forks a destination copy of itself,
 * mmaps "guest RAM", fills it, starts writer threads that dirty it while keeping their own
 * dirty bitmap (as KVM's dirty log does), and migrates it to the destination over loopback with
 * the step API (setup, iterate until ready, complete), the way QEMU drives its save_live_*
 * handlers. After the pause the source hashes its own memory and sends the hash to the
 * destination through a pipe, outside rmig; the destination checks every byte against it.
 * The last line printed is the source's statistics as JSON; the exit status is 0 only when
 * the destination verified.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <rmig.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WRITERS 2
static const char KEY[] = "minivmm example key";

struct vm {
    uint8_t *ram;
    size_t size, pages;
    _Atomic uint64_t *dirty; /* one bit per page, set after each write */
    atomic_int stop, paused, inflight, throttle;
    pthread_t writers[WRITERS];
    int hash_fd; /* source: where the hash goes after the pause */
    /* destination */
    uint8_t *device_state;
    size_t device_state_len;
    int resumed;
};

static uint64_t hash_mem(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++) {
        h ^= w[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t rng_next(uint64_t *s) {
    *s += 0x9e3779b97f4a7c15ull;
    uint64_t z = *s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void *writer(void *arg) {
    struct vm *vm = arg;
    uint64_t s = (uint64_t)pthread_self();
    size_t hot = vm->pages / 8 ? vm->pages / 8 : 1;
    while (!atomic_load(&vm->stop)) {
        if (atomic_load(&vm->paused)) {
            usleep(1000);
            continue;
        }
        atomic_fetch_add(&vm->inflight, 1);
        if (!atomic_load(&vm->paused)) {
            for (int i = 0; i < 64; i++) {
                size_t page = rng_next(&s) % hot;
                size_t off = page * PAGE + (rng_next(&s) % (PAGE / 8)) * 8;
                *(volatile uint64_t *)(vm->ram + off) = rng_next(&s);
                atomic_fetch_or(&vm->dirty[page / 64], 1ull << (page % 64)); /* write, then mark */
            }
        }
        atomic_fetch_sub(&vm->inflight, 1);
        usleep(200 + 20 * atomic_load(&vm->throttle));
    }
    return NULL;
}

/* ---- callbacks ---- */

static int cb_dirty_sync(void *opaque, uint32_t region, uint64_t *bitmap, size_t words) {
    struct vm *vm = opaque;
    if (region != 0 || words != (vm->pages + 63) / 64)
        return -1;
    for (size_t i = 0; i < words; i++)
        bitmap[i] = atomic_exchange(&vm->dirty[i], 0);
    return 0;
}

static int cb_pause(void *opaque) {
    struct vm *vm = opaque;
    atomic_store(&vm->paused, 1);
    while (atomic_load(&vm->inflight))
        sched_yield();
    /* The guest is stopped: hash its memory now and send the hash outside rmig. */
    uint64_t h = hash_mem(vm->ram, vm->size);
    if (write(vm->hash_fd, &h, sizeof h) != sizeof h)
        return -1;
    return 0;
}

static void cb_source_resume(void *opaque) {
    struct vm *vm = opaque;
    atomic_store(&vm->paused, 0);
}

static void cb_throttle(void *opaque, uint32_t percent) {
    struct vm *vm = opaque;
    atomic_store(&vm->throttle, (int)percent);
}

static int cb_save_device_state(void *opaque, rmig_bytes *out) {
    struct vm *vm = opaque;
    char s[64];
    int n = snprintf(s, sizeof s, "minivmm-devstate pages=%zu", vm->pages);
    return rmig_bytes_append(out, (const uint8_t *)s, (size_t)n) == RMIG_OK ? 0 : -1;
}

static int cb_load_device_state(void *opaque, const uint8_t *data, size_t len) {
    struct vm *vm = opaque;
    free(vm->device_state);
    vm->device_state = malloc(len ? len : 1);
    if (!vm->device_state)
        return -1;
    memcpy(vm->device_state, data, len);
    vm->device_state_len = len;
    return 0;
}

static void cb_dest_resume(void *opaque) {
    struct vm *vm = opaque;
    vm->resumed = 1;
}

/* ---- helpers ---- */

static uint8_t *map_ram(size_t size, int populate) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0), -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static int check(rmig_status s, const char *what) {
    if (s != RMIG_OK)
        fprintf(stderr, "minivmm: %s failed (%d): %s\n", what, (int)s, rmig_last_error());
    return s == RMIG_OK;
}

/* Downtime limit; a second argument changes it (valgrind slows the encryption tenfold). */
static uint64_t downtime_limit_ms = 100;

static void config(rmig_config *c, const char *addr) {
    rmig_config_default(c);
    c->address = addr;
    c->key = (const uint8_t *)KEY;
    c->key_len = sizeof KEY - 1;
    c->lanes = 2;
    c->transport = RMIG_TRANSPORT_AUTO; /* a uint32_t holding one of the RMIG_TRANSPORT_* */
    c->encryption = RMIG_ENCRYPTION_TLS_PSK; /* TLS 1.3, the key proven on each connection */
    c->downtime_limit_ms = downtime_limit_ms;
}

/* ---- destination (the forked child) ---- */

static int run_dest(size_t size, int port_fd, int hash_fd) {
    struct vm vm = {0};
    vm.size = size;
    vm.pages = size / PAGE;
    vm.ram = map_ram(size, 1);
    if (!vm.ram)
        return 2;
    rmig_config c;
    config(&c, "127.0.0.1:0");
    rmig_callbacks cb = {.opaque = &vm,
                         .load_device_state = cb_load_device_state,
                         .resume = cb_dest_resume};
    rmig_session s = 0;
    uint16_t port = 0;
    int ok = check(rmig_dest_new(&c, &cb, &s), "rmig_dest_new") &&
             check(rmig_add_region(s, 0, "pc.ram", vm.ram, size, 0, PAGE), "rmig_add_region") &&
             check(rmig_dest_port(s, &port), "rmig_dest_port");
    if (write(port_fd, &port, sizeof port) != sizeof port)
        ok = 0;
    close(port_fd);
    ok = ok && check(rmig_migrate(s), "rmig_migrate (destination)");
    rmig_free(s);
    uint64_t want = 0;
    if (read(hash_fd, &want, sizeof want) != sizeof want) {
        fprintf(stderr, "minivmm dest: no hash from the source\n");
        ok = 0;
    }
    uint64_t have = hash_mem(vm.ram, size);
    char expect[64];
    int n = snprintf(expect, sizeof expect, "minivmm-devstate pages=%zu", vm.pages);
    int dev_ok = vm.device_state_len == (size_t)n && memcmp(vm.device_state, expect, (size_t)n) == 0;
    fprintf(stderr, "minivmm dest: %s, memory hash %016llx vs source %016llx, device state %s\n",
            ok ? "migrated" : "FAILED", (unsigned long long)have, (unsigned long long)want,
            dev_ok ? "ok" : "WRONG");
    free(vm.device_state);
    munmap(vm.ram, size);
    return ok && vm.resumed && have == want && dev_ok ? 0 : 1;
}

/* ---- source ---- */

int main(int argc, char **argv) {
    size_t size = (size_t)(argc > 1 ? strtoul(argv[1], NULL, 10) : 64) << 20;
    if (argc > 2)
        downtime_limit_ms = strtoull(argv[2], NULL, 10);
    if (size == 0 || size % PAGE || downtime_limit_ms == 0) {
        fprintf(stderr, "usage: %s [size in MiB] [downtime limit in ms]\n", argv[0]);
        return 2;
    }
    int port_pipe[2], hash_pipe[2];
    if (pipe(port_pipe) || pipe(hash_pipe))
        return 2;
    pid_t child = fork();
    if (child < 0)
        return 2;
    if (child == 0) {
        close(port_pipe[0]);
        close(hash_pipe[1]);
        _exit(run_dest(size, port_pipe[1], hash_pipe[0]));
    }
    close(port_pipe[1]);
    close(hash_pipe[0]);

    struct vm vm = {0};
    vm.size = size;
    vm.pages = size / PAGE;
    vm.hash_fd = hash_pipe[1];
    vm.ram = map_ram(size, 1);
    vm.dirty = calloc((vm.pages + 63) / 64, sizeof *vm.dirty);
    if (!vm.ram || !vm.dirty)
        return 2;
    uint64_t seed = 42;
    for (size_t i = 0; i < size / 8; i++)
        ((uint64_t *)vm.ram)[i] = (i / 512) % 4 == 0 ? 0 : rng_next(&seed); /* a quarter zero pages */

    uint16_t port = 0;
    if (read(port_pipe[0], &port, sizeof port) != sizeof port || port == 0) {
        fprintf(stderr, "minivmm: the destination did not start\n");
        waitpid(child, NULL, 0);
        return 1;
    }
    for (int i = 0; i < WRITERS; i++)
        pthread_create(&vm.writers[i], NULL, writer, &vm);

    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    rmig_config c;
    config(&c, addr);
    rmig_callbacks cb = {.opaque = &vm,
                         .dirty_sync = cb_dirty_sync,
                         .pause = cb_pause,
                         .resume = cb_source_resume,
                         .throttle = cb_throttle,
                         .save_device_state = cb_save_device_state};
    rmig_session s = 0;
    int ok = check(rmig_source_new(&c, &cb, &s), "rmig_source_new") &&
             check(rmig_add_region(s, 0, "pc.ram", vm.ram, size, 0, PAGE), "rmig_add_region") &&
             check(rmig_setup(s), "rmig_setup");
    int32_t ready = 0;
    while (ok && !ready)
        ok = check(rmig_iterate(s, &ready), "rmig_iterate");
    ok = ok && check(rmig_complete(s), "rmig_complete");
    close(hash_pipe[1]);

    atomic_store(&vm.stop, 1);
    for (int i = 0; i < WRITERS; i++)
        pthread_join(vm.writers[i], NULL);

    rmig_stats st;
    if (ok && (rmig_get_stats(s, &st) != RMIG_OK || st.encryption != RMIG_ENCRYPTION_TLS_PSK)) {
        fprintf(stderr, "minivmm: the migration was not encrypted\n");
        ok = 0;
    }
    size_t need = 0;
    rmig_stats_json(s, NULL, 0, &need);
    char *json = malloc(need ? need : 1);
    if (json && rmig_stats_json(s, json, need, NULL) != RMIG_OK)
        json[0] = 0;
    rmig_free(s);

    int status = 1;
    waitpid(child, &status, 0);
    int dest_ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    printf("%s\n", json ? json : "{}");
    free(json);
    free((void *)vm.dirty);
    munmap(vm.ram, size);
    return ok && dest_ok ? 0 : 1;
}

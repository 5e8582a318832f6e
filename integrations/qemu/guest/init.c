/*
 * rmig-guest: a guest that checks its own memory, run as /init of an initramfs.
 *
 * Why: a migration test needs a guest whose memory proves itself. This one fills MiB of
 * memory with pages that carry their own index, generation and checksum (and, in a share of
 * them, nothing but zeros), keeps rewriting a hot set at a given rate, checks every page over
 * and over, and prints one line per second on the console:
 *
 *   rmig-guest tick=T passes=P bad=B gen=G written_mb=W
 *
 * A page that lost or mixed up its bytes (a missed dirty page, a page sent to the wrong
 * place, a torn page) fails its checksum or its index and counts in `bad`, for good.
 *
 * Kernel command line: rmig.mib=N (memory to fill, default 256), rmig.rate=R (MB/s
 * rewritten, default 0), rmig.hot=H (MiB of the hot set, default 128), rmig.zero=Z (percent
 * of zero pages, default 30), rmig.corrupt=1 (flip a bit once: the checker's self-test,
 * which must show bad>0).
 *
 * SPDX-License-Identifier: MIT OR Apache-2.0
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <fcntl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

/* Page layout: word 0 index, word 1 generation, word 2 checksum of words 3.. */
struct conf {
    uint64_t mib, rate, hot, zero, corrupt;
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static uint64_t sum_words(const volatile uint64_t *p)
{
    uint64_t h = 0x9e3779b97f4a7c15ull;
    for (int i = 3; i < WORDS; i++) {
        h = (h ^ p[i]) * 0x100000001b3ull;
    }
    return h;
}

static int is_zero_page(const struct conf *c, uint64_t idx)
{
    return mix(idx ^ 0x5a5a) % 100 < c->zero;
}

/* Writes page `idx` at generation `gen`: random words, then the header. */
static void write_page(volatile uint64_t *p, uint64_t idx, uint64_t gen)
{
    uint64_t s = mix(idx * 0x9e3779b97f4a7c15ull + gen);
    for (int i = 3; i < WORDS; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        p[i] = s;
    }
    p[0] = idx;
    p[1] = gen;
    p[2] = sum_words(p);
}

/* 1 when page `idx` holds what it should (its bytes, or zeros). */
static int check_page(const struct conf *c, const volatile uint64_t *p, uint64_t idx)
{
    if (is_zero_page(c, idx)) {
        for (int i = 0; i < WORDS; i++) {
            if (p[i]) {
                return 0;
            }
        }
        return 1;
    }
    return p[0] == idx && p[2] == sum_words(p);
}

static uint64_t arg(const char *cmdline, const char *key, uint64_t def)
{
    const char *s = strstr(cmdline, key);
    return s ? strtoull(s + strlen(key), NULL, 10) : def;
}

static void read_conf(struct conf *c)
{
    char buf[4096] = "";
    FILE *f;

    /* The console: an initramfs without /dev/console starts with no stdout. */
    mkdir("/dev", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    int fd = open("/dev/console", O_RDWR);
    if (fd >= 0) {
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        if (fd > 2) {
            close(fd);
        }
    }
    mkdir("/proc", 0555);
    mount("proc", "/proc", "proc", 0, NULL);
    f = fopen("/proc/cmdline", "r");
    if (f) {
        if (!fgets(buf, sizeof(buf), f)) {
            buf[0] = 0;
        }
        fclose(f);
    }
    c->mib = arg(buf, "rmig.mib=", 256);
    c->rate = arg(buf, "rmig.rate=", 0);
    c->hot = arg(buf, "rmig.hot=", 128);
    c->zero = arg(buf, "rmig.zero=", 30);
    c->corrupt = arg(buf, "rmig.corrupt=", 0);
    if (c->hot > c->mib) {
        c->hot = c->mib;
    }
}

int main(void)
{
    struct conf c;
    read_conf(&c);
    uint64_t pages = c.mib * 256, hot_pages = c.hot * 256;
    volatile uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        printf("rmig-guest: cannot map %llu MiB\n", (unsigned long long)c.mib);
        reboot(RB_POWER_OFF);
        return 1;
    }
    for (uint64_t i = 0; i < pages; i++) {
        if (!is_zero_page(&c, i)) {
            write_page(mem + i * WORDS, i, 0);
        }
    }
    if (c.corrupt) {
        /* Self-test of the checker: flip one bit of page 1 (never rewritten after). */
        mem[(hot_pages + 1) % pages * WORDS + 100] ^= 1;
        mem[(hot_pages + 1) % pages * WORDS] = 1;
    }
    printf("rmig-guest ready mib=%llu rate=%llu hot=%llu zero=%llu\n",
           (unsigned long long)c.mib, (unsigned long long)c.rate,
           (unsigned long long)c.hot, (unsigned long long)c.zero);
    fflush(stdout);

    uint64_t t0 = now_ns(), next_tick = t0 + 1000000000ull;
    uint64_t gen = 1, written = 0, hot_next = 0, check_next = 0;
    uint64_t passes = 0, bad = 0, tick = 0;
    for (;;) {
        uint64_t t = now_ns();
        /* Writer: keep the bytes written at rate * elapsed. */
        uint64_t due = c.rate * (t - t0) / 1000; /* bytes: MB/s * ns / 1000 */
        for (int n = 0; n < 64 && written < due && hot_pages; n++) {
            uint64_t idx = hot_next;
            if (!is_zero_page(&c, idx)) {
                write_page(mem + idx * WORDS, idx, gen);
            }
            written += PAGE;
            if (++hot_next == hot_pages) {
                hot_next = 0;
                gen++;
            }
        }
        /* Checker: the next 256 pages. */
        for (int n = 0; n < 256; n++) {
            if (!check_page(&c, mem + check_next * WORDS, check_next)) {
                bad++;
                if (bad <= 5) {
                    printf("rmig-guest BAD page=%llu\n", (unsigned long long)check_next);
                }
            }
            if (++check_next == pages) {
                check_next = 0;
                passes++;
            }
        }
        if (t >= next_tick) {
            tick++;
            next_tick += 1000000000ull;
            if (next_tick < t) {
                next_tick = t + 1000000000ull;
            }
            printf("rmig-guest tick=%llu passes=%llu bad=%llu gen=%llu written_mb=%llu\n",
                   (unsigned long long)tick, (unsigned long long)passes,
                   (unsigned long long)bad, (unsigned long long)gen,
                   (unsigned long long)(written >> 20));
            fflush(stdout);
        }
    }
}

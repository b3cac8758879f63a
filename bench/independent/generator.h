/* What the independent load generators in C (heartbeat.c, join.c) share: clocks, errors,
 * a growing array of doubles and its percentiles, failures counted by reason, and JSON output
 * as JavaScript's JSON.stringify writes it (heartbeat.mjs's output is the model).
 *
 * Define PROGRAM (the name errors start with) and USAGE (the usage text) before including. */

#ifndef MUSTER_GENERATOR_H
#define MUSTER_GENERATOR_H

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000LL
#define NFAIL 64 /* failure reasons kept; the last gathers the rest as "other" */

static inline int64_t clock_ns(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return (int64_t)t.tv_sec * NS + t.tv_nsec;
}

static inline int64_t mono_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

/* JavaScript's Math.round(x * 100) / 100 */
static inline double round2(double x) { return floor(x * 100 + 0.5) / 100; }
static inline double round4(double x) { return floor(x * 10000 + 0.5) / 10000; }
static inline long jsround(double x) { return (long)floor(x + 0.5); }

static inline void __attribute__((noreturn)) die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs(PROGRAM ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static inline void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs(PROGRAM ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fputs(USAGE, stderr);
    exit(2);
}

static inline void *xmalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) die("out of memory (%zu bytes)", n);
    return p;
}

static inline const char *errname(int e) {
    const char *s = e ? strerrorname_np(e) : NULL;
    return s ? s : "ECONNRESET";
}

static inline int write_full(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static inline int read_full(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

typedef struct {
    double *v;
    size_t n, cap;
} vec_t;

static inline void vec_reserve(vec_t *a, size_t cap) {
    if (cap <= a->cap) return;
    double *v = realloc(a->v, cap * sizeof *v);
    if (!v) die("out of memory");
    a->v = v;
    a->cap = cap;
}

static inline void vec_push(vec_t *a, double x) {
    if (a->n == a->cap) vec_reserve(a, a->cap ? a->cap * 2 : 1024);
    a->v[a->n++] = x;
}

static inline int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* heartbeat.mjs's percentile: nearest rank on sorted values */
static inline double percentile(const double *sorted, size_t n, double p) {
    if (!n) return 0;
    double rank = ceil((p / 100) * (double)n) - 1;
    if (rank < 0) rank = 0;
    if (rank > (double)(n - 1)) rank = (double)(n - 1);
    return sorted[(size_t)rank];
}

/* failures by reason: an HTTP status ("503") or a connection error ("ECONNREFUSED") */
typedef struct {
    char key[32];
    uint64_t n;
} fail_t;

static inline void fail_add(fail_t *tab, uint32_t *ntab, const char *key, uint64_t n) {
    for (;;) {
        for (uint32_t i = 0; i < *ntab; i++)
            if (!strcmp(tab[i].key, key)) {
                tab[i].n += n;
                return;
            }
        if (*ntab < NFAIL - 1 || !strcmp(key, "other")) break;
        key = "other"; /* the last entry gathers the rest */
    }
    size_t len = strnlen(key, sizeof tab[*ntab].key - 1); /* cut to fit */
    memcpy(tab[*ntab].key, key, len);
    tab[*ntab].key[len] = 0;
    tab[*ntab].n = n;
    (*ntab)++;
}

/* a number as JSON.stringify writes it (the values here are integers or have 2 decimals) */
static inline void jnum(double x) {
    char b[40];
    if (x != x || x > 1e300 || x < -1e300) {
        fputs("null", stdout);
        return;
    }
    if (x == 0) x = 0; /* no -0 */
    if (x == floor(x) && x < 1e15 && x > -1e15) {
        printf("%" PRId64, (int64_t)x);
        return;
    }
    for (int p = 1; p <= 17; p++) {
        snprintf(b, sizeof b, "%.*g", p, x);
        if (strtod(b, NULL) == x) break;
    }
    fputs(b, stdout);
}

static inline void jstr(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static inline int numeric_key(const char *s) {
    if (!*s || strlen(s) > 9 || (s[0] == '0' && s[1])) return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9') return 0;
    return 1;
}


/* failures as a JSON object, in JavaScript's key order: integer keys (HTTP statuses)
 * ascending, then the rest as first seen */
static inline void print_failures(const fail_t *fails, uint32_t nfail) {
    putchar('{');
    int comma = 0;
    for (long last = -1;;) {
        long best = -1;
        for (uint32_t k = 0; k < nfail; k++) {
            long v = numeric_key(fails[k].key) ? strtol(fails[k].key, NULL, 10) : -1;
            if (v > last && (best < 0 || v < best)) best = v;
        }
        if (best < 0) break;
        printf("%s\"%ld\":", comma ? "," : "", best);
        for (uint32_t k = 0; k < nfail; k++)
            if (numeric_key(fails[k].key) && strtol(fails[k].key, NULL, 10) == best)
                printf("%" PRIu64, fails[k].n);
        comma = 1;
        last = best;
    }
    for (uint32_t k = 0; k < nfail; k++) {
        if (numeric_key(fails[k].key)) continue;
        if (comma) putchar(',');
        jstr(fails[k].key);
        printf(":%" PRIu64, fails[k].n);
        comma = 1;
    }
    putchar('}');
}

#endif

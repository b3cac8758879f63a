/* An independent heartbeat load generator for a Muster coordinator in C (C11, OpenSSL 3, Linux
 * epoll), with the command line and the JSON output of heartbeat.mjs beside it, which is the
 * specification of its behaviour: N hosts, each with its own client certificate from a cached
 * fleet, each on its own keep-alive TLS connection from its own 127.x.y.z address, send
 * POST /api/v1/agent/heartbeat every --interval seconds at a random phase, open loop. Latency
 * counts from each heartbeat's intended send time. It exists because it costs the shared cores
 * far less per heartbeat than Node does, so 100,000 hosts can be driven on a small machine.
 *
 *   gcc -O2 -Wall -Wextra -o heartbeat bench/independent/heartbeat.c -lssl -lcrypto -lm
 *   ./heartbeat --fleet DIR --port PORT --hosts 25000 --interval 10 --seconds 120 \
 *     [--processes 2] [--coordinator-pid PID] [--version V] [--ca FILE] [--connecting 32]
 *
 * The parent forks P = max(--processes, ceil(hosts / 16000)) children, each with a contiguous
 * slice of the hosts, and talks to each over two pipes. A child loads its hosts' certificates
 * and keys, connects them --connecting at a time (a connection's first heartbeat is its
 * connect, not measured), schedules each host as it connects, and sends the parent {connected,
 * connect_failed} once all have. Then the parent names the window [from, to) (CLOCK_MONOTONIC,
 * one interval and SETTLE_S from then) and each child measures the heartbeats whose intended
 * time falls in it, and its own CPU over it, and at to + interval + 1 s sends the parent its
 * raw results (binary, over the pipe), closes its connections and exits. The parent merges
 * them and prints one line of JSON.
 *
 * Each child runs one event loop: nonblocking sockets and SSL objects on an edge-triggered
 * epoll, and a binary min-heap of its hosts keyed on each one's next timer (its next slot, or
 * the deadline of its request in flight), the earliest of which is epoll's timeout. */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#define PER_PROCESS 16000 /* connections per process: under the 20,000 open-files limit */
#define CONNECTING 32     /* default first connections (TLS handshakes) in flight per process */
#define SETTLE_S 5        /* after every host is connected, before the measured window */
#define SLOW_MS 50        /* heartbeats slower than this are counted per second of the window */
#define MAX_HOSTS 2032000 /* 127.1.0.1 ... 127.254.31.250: 8,000 source addresses per /16 */
#define RBUF 2048         /* per host: a response's status line and headers */
#define MAXEV 512
#define NEVER INT64_MAX
#define CONTROL_TAG 0xffffffffu

#define MAGIC_WINDOW 0x57494e44u
#define MAGIC_CONNECTED 0x434f4e4eu
#define MAGIC_RESULT 0x52455355u

static const char USAGE[] =
    "usage: heartbeat --fleet DIR --port PORT --hosts N [--interval SECONDS] [--seconds SECONDS]\n"
    "                 [--processes P] [--coordinator-pid PID] [--version V] [--ca FILE]\n"
    "                 [--connecting K]\n";

#define PROGRAM "heartbeat"
#include "generator.h"

/* ---------------------------------------------------------------- options */

static struct {
    const char *fleet, *ca, *version;
    int port, processes, connecting;
    long hosts, coordinator_pid;
    double interval_s, seconds;
} opt = {.version = "0.0.0", .interval_s = 10, .seconds = 60, .processes = 1,
         .connecting = CONNECTING};

/* ---------------------------------------------------------------- messages on the pipes */

typedef struct {
    uint32_t magic, pad;
    int64_t from, to;
} window_msg;

typedef struct {
    uint32_t magic, pad;
    uint64_t connected, connect_failed;
} connected_msg;

typedef struct {
    uint32_t magic, nfail;
    uint64_t nlat, nlag, nslow, missed;
    double cpu_s, loop_p99_ms, loop_max_ms;
} result_head; /* then nlat doubles, nlag doubles, nslow {n, late} pairs, nfail fail_t */

/* ---------------------------------------------------------------- a child: the hosts */

enum { S_NONE, S_TCP, S_TLS, S_WRITE, S_READ, S_IDLE };
#define BUSY(h) ((h)->state != S_NONE && (h)->state != S_IDLE)

typedef struct {
    SSL *ssl;
    X509 *cert;
    EVP_PKEY *key;
    int64_t due;       /* the next slot, while scheduled */
    int64_t intended;  /* the request in flight: its slot */
    int64_t deadline;  /* ... and when it times out */
    int64_t lag;       /* ... and how late it was sent */
    int64_t body_left; /* bytes of the response's body still to read */
    int fd, heap_pos, index, status;
    uint32_t gen; /* tags epoll events, so a closed connection's stale events are dropped */
    uint16_t rlen;
    uint8_t state, scheduled, first, hdr_done, conn_close;
    uint8_t drained; /* the last read(2) left the socket empty (short read or EAGAIN) */
    uint8_t eof;     /* ... or found the end of the stream */
    char rbuf[RBUF];
} host_t;

typedef struct { /* the timer heap's entries: the key kept here, not in the (large) host */
    int64_t wake; /* min(next slot, deadline of the request in flight) */
    int host;
} heap_entry;

static struct {
    int id, first, count;
    host_t *hosts;
    heap_entry *heap;
    int heap_n;
    SSL_CTX *ctx;
    int ep, up, down;
    int64_t interval, from, to, end;
    char *req;
    int reqlen;
    struct sockaddr_in dst;
    uint64_t rng;
    int connect_next, connect_inflight, connect_done, connect_failed, connect_reported;
    int64_t connect_started;
    vec_t lat, lag, loop;
    double (*slow)[2];
    size_t nslow;
    uint64_t missed;
    fail_t fails[NFAIL];
    uint32_t nfail;
    int logged;
    int64_t cpu_from, cpu_to;
    int cpu_from_taken, cpu_to_taken;
    struct rusage ru_from, ru_to;
    uint64_t wakeups, events, wakeups_from, events_from, wakeups_to, events_to;
    int use_pwait2;
} C;

static double rnd(void) { /* splitmix64 -> [0, 1) */
    uint64_t z = (C.rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

static void heap_set(int i, heap_entry t) {
    C.heap[i] = t;
    C.hosts[t.host].heap_pos = i;
}

static void heap_up(int i) {
    heap_entry t = C.heap[i];
    while (i > 0) {
        int p = (i - 1) / 2;
        if (C.heap[p].wake <= t.wake) break;
        heap_set(i, C.heap[p]);
        i = p;
    }
    heap_set(i, t);
}

static void heap_down(int i) {
    heap_entry t = C.heap[i];
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = l;
        if (l >= C.heap_n) break;
        if (r < C.heap_n && C.heap[r].wake < C.heap[l].wake) m = r;
        if (C.heap[m].wake >= t.wake) break;
        heap_set(i, C.heap[m]);
        i = m;
    }
    heap_set(i, t);
}

/* Put the host in the heap at its next timer: its next slot (none from `to` on) or, while a
 * request is in flight, that request's deadline if sooner; out of the heap if neither. */
static void rearm(host_t *h) {
    int64_t w = NEVER;
    if (h->scheduled && h->due < C.to) w = h->due;
    if (BUSY(h) && h->deadline < w) w = h->deadline;
    int i = h->heap_pos;
    if (w == NEVER) {
        if (i < 0) return;
        h->heap_pos = -1;
        if (i != --C.heap_n) {
            int64_t old = C.heap[i].wake;
            heap_set(i, C.heap[C.heap_n]);
            if (C.heap[i].wake < old)
                heap_up(i);
            else
                heap_down(i);
        }
        return;
    }
    if (i < 0) {
        i = C.heap_n++;
        C.heap[i] = (heap_entry){w, (int)(h - C.hosts)};
        heap_up(i);
    } else if (w != C.heap[i].wake) {
        int64_t old = C.heap[i].wake;
        C.heap[i].wake = w;
        if (w < old)
            heap_up(i);
        else
            heap_down(i);
    }
}

static void conn_close(host_t *h) {
    if (h->ssl) {
        SSL_free(h->ssl);
        h->ssl = NULL;
    }
    if (h->fd >= 0) {
        close(h->fd); /* which takes it out of the epoll set */
        h->fd = -1;
    }
    h->gen++;
    h->state = S_NONE;
}

/* The request in flight has ended (the host's state already says how): count it. */
static void finish(host_t *h, int status, const char *reason) {
    int64_t now = mono_ns();
    if (h->first) { /* the connection's first heartbeat: not measured; schedule the host */
        h->first = 0;
        C.connect_inflight--;
        C.connect_done++;
        if (status != 200) C.connect_failed++;
        h->scheduled = 1;
        h->due = now + (int64_t)(rnd() * (double)C.interval);
    } else if (h->intended >= C.from && h->intended < C.to) {
        vec_push(&C.lag, (double)h->lag / 1e6);
        if (status == 200) {
            double ms = (double)(now - h->intended) / 1e6;
            vec_push(&C.lat, ms);
            if (ms > SLOW_MS) {
                size_t second = (size_t)((h->intended - C.from) / NS);
                if (second < C.nslow) {
                    C.slow[second][0] += 1;
                    double lagms = (double)h->lag / 1e6;
                    if (lagms > C.slow[second][1]) C.slow[second][1] = lagms;
                }
            }
        } else {
            char code[16];
            if (status > 0) {
                snprintf(code, sizeof code, "%d", status);
                reason = code;
            }
            fail_add(C.fails, &C.nfail, reason, 1);
        }
    }
    rearm(h);
}

static void fail(host_t *h, const char *reason, const char *detail) {
    if (C.logged < 5) {
        C.logged++;
        fprintf(stderr, "heartbeat: process %d: host %05d: %s%s%s%s\n", C.id, h->index, reason,
                detail ? " (" : "", detail ? detail : "", detail ? ")" : "");
    }
    conn_close(h);
    finish(h, 0, reason);
}

/* An SSL call returned r <= 0: wait for the socket, or fail the request. */
static void ssl_trouble(host_t *h, int r) {
    int e = SSL_get_error(h->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
    unsigned long code = ERR_peek_error();
    const char *reason = "tls";
    if (e == SSL_ERROR_SYSCALL)
        reason = errname(errno);
    else if (e == SSL_ERROR_ZERO_RETURN)
        reason = "ECONNRESET";
    else if (e == SSL_ERROR_SSL && ERR_GET_LIB(code) == ERR_LIB_SSL &&
             ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING)
        reason = "ECONNRESET"; /* the peer closed mid-request: Node's "socket hang up" */
    char detail[160] = "";
    if (code) ERR_error_string_n(code, detail, sizeof detail);
    ERR_clear_error();
    fail(h, reason, code ? detail : NULL);
}

/* The status line and headers in h->rbuf[0, end): status, Content-Length, Connection. */
static int parse_head(host_t *h, size_t end) {
    const char *p = h->rbuf, *stop = h->rbuf + end;
    const char *nl = memchr(p, '\n', (size_t)(stop - p));
    if (!nl || nl - p < 12 || memcmp(p, "HTTP/1.", 7) || p[8] != ' ') return -1;
    int status = 0;
    for (int i = 9; i < 12; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        status = status * 10 + (p[i] - '0');
    }
    int64_t length = -1;
    h->conn_close = 0;
    for (p = nl + 1; p < stop; p = nl + 1) {
        nl = memchr(p, '\n', (size_t)(stop - p));
        if (!nl) break;
        const char *e = nl;
        if (e > p && e[-1] == '\r') e--;
        if (e == p) break; /* the blank line */
        const char *colon = memchr(p, ':', (size_t)(e - p));
        if (!colon) return -1;
        size_t nlen = (size_t)(colon - p);
        const char *v = colon + 1;
        while (v < e && (*v == ' ' || *v == '\t')) v++;
        const char *ve = e;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        if (nlen == 14 && !strncasecmp(p, "content-length", 14)) {
            int64_t n = 0;
            if (v == ve || ve - v > 15) return -1;
            for (const char *d = v; d < ve; d++) {
                if (*d < '0' || *d > '9') return -1;
                n = n * 10 + (*d - '0');
            }
            if (length >= 0 && length != n) return -1;
            length = n;
        } else if (nlen == 17 && !strncasecmp(p, "transfer-encoding", 17)) {
            return -1; /* the coordinator always sends a Content-Length */
        } else if (nlen == 10 && !strncasecmp(p, "connection", 10)) {
            for (const char *t = v; t + 5 <= ve; t++)
                if (!strncasecmp(t, "close", 5)) h->conn_close = 1;
        }
    }
    if (length < 0) return -1;
    h->status = status;
    h->body_left = length - (int64_t)(h->rlen - end);
    return h->body_left < 0 ? -1 : 0; /* more than the body: nothing is pipelined */
}

static void drive(host_t *h, uint32_t events);

/* The connection's BIO: a socket BIO, but one that says whether its last read(2) emptied the
 * socket, so that an SSL_read that would only find EAGAIN can be skipped (with edge-triggered
 * epoll every segment that arrives later raises an event of its own). */
static int sock_write(BIO *b, const char *buf, int len) {
    host_t *h = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    ssize_t n = write(h->fd, buf, (size_t)len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) BIO_set_retry_write(b);
    return (int)n;
}

static int sock_read(BIO *b, char *buf, int len) {
    host_t *h = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    ssize_t n = read(h->fd, buf, (size_t)len);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) {
            BIO_set_retry_read(b);
            h->drained = 1;
        }
        return -1;
    }
    h->drained = n < len;
    if (n == 0) h->eof = 1;
    return (int)n;
}

static long sock_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)num;
    (void)ptr;
    switch (cmd) {
    case BIO_CTRL_FLUSH: return 1;
    case BIO_CTRL_EOF: return ((host_t *)BIO_get_data(b))->eof;
    default: return 0;
    }
}

static int sock_create(BIO *b) {
    BIO_set_init(b, 1);
    return 1;
}

static BIO_METHOD *sock_method(void) {
    static BIO_METHOD *m;
    if (!m) {
        m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR,
                         "heartbeat socket");
        if (!m || !BIO_meth_set_write(m, sock_write) || !BIO_meth_set_read(m, sock_read) ||
            !BIO_meth_set_ctrl(m, sock_ctrl) || !BIO_meth_set_create(m, sock_create))
            die("BIO_meth_new failed");
    }
    return m;
}

static void tls_start(host_t *h) {
    SSL *s = SSL_new(C.ctx);
    BIO *bio = s ? BIO_new(sock_method()) : NULL;
    if (bio) {
        BIO_set_data(bio, h);
        SSL_set_bio(s, bio, bio); /* which owns it from here */
    }
    if (!bio || SSL_use_certificate(s, h->cert) != 1 || SSL_use_PrivateKey(s, h->key) != 1) {
        char detail[160] = "";
        ERR_error_string_n(ERR_peek_error(), detail, sizeof detail);
        ERR_clear_error();
        if (s) SSL_free(s);
        fail(h, "tls", detail);
        return;
    }
    h->drained = h->eof = 0;
    SSL_set_connect_state(s);
    h->ssl = s;
    h->state = S_TLS;
}

/* A new connection from the host's own address; the request follows its handshake. */
static void conn_open(host_t *h) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fail(h, errname(errno), "socket");
        return;
    }
    h->fd = fd;
    h->gen++;
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* heartbeat.mjs's sourceAddress: one loopback address per host */
    struct sockaddr_in src = {.sin_family = AF_INET};
    uint32_t i = (uint32_t)h->index;
    src.sin_addr.s_addr = htonl((127u << 24) | ((i / 8000 + 1) << 16) | (((i / 250) % 32) << 8) |
                                (i % 250 + 1));
    if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
        fail(h, errname(errno), "bind");
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET};
    ev.data.u64 = ((uint64_t)h->gen << 32) | (uint32_t)(h - C.hosts);
    if (epoll_ctl(C.ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        fail(h, errname(errno), "epoll_ctl");
        return;
    }
    if (connect(fd, (struct sockaddr *)&C.dst, sizeof C.dst) == 0) {
        tls_start(h);
        if (h->state == S_TLS) drive(h, 0);
    } else if (errno == EINPROGRESS) {
        h->state = S_TCP;
    } else {
        fail(h, errname(errno), NULL);
    }
}

/* Send a heartbeat for the slot `intended` (reconnecting first if the host has no connection). */
static void start_request(host_t *h, int64_t intended, int first) {
    h->intended = intended;
    h->deadline = intended + C.interval;
    h->first = (uint8_t)first;
    h->lag = mono_ns() - intended;
    if (h->state == S_IDLE) {
        h->state = S_WRITE;
        drive(h, 0);
    } else {
        conn_open(h);
    }
    rearm(h);
}

static void drive(host_t *h, uint32_t events) {
    static char scratch[16384];
    int r, fresh = events != 0; /* a new event: the socket may have something to read */
    for (;;) switch (h->state) {
        case S_NONE:
            return;
        case S_TCP: {
            if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
            int err = 0;
            socklen_t len = sizeof err;
            if (getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
            if (err) {
                fail(h, errname(err), NULL);
                return;
            }
            tls_start(h);
            break;
        }
        case S_TLS:
            errno = 0;
            r = SSL_do_handshake(h->ssl);
            if (r != 1) {
                ssl_trouble(h, r);
                return;
            }
            h->state = S_WRITE;
            break;
        case S_WRITE:
            errno = 0;
            r = SSL_write(h->ssl, C.req, C.reqlen); /* retried with the same arguments */
            if (r <= 0) {
                ssl_trouble(h, r);
                return;
            }
            h->state = S_READ;
            h->rlen = 0;
            h->hdr_done = 0;
            fresh = 0; /* the reply cannot be there yet */
            break;
        case S_READ:
            if (h->hdr_done && h->body_left == 0) { /* the reply is complete */
                if (h->conn_close)
                    conn_close(h); /* the next slot reconnects */
                else
                    h->state = S_IDLE;
                finish(h, h->status, NULL);
                return;
            }
            /* nothing buffered, and the socket was empty when last read: wait for an event */
            if (!fresh && h->drained && !SSL_has_pending(h->ssl)) return;
            fresh = 0;
            errno = 0;
            if (!h->hdr_done) {
                if (h->rlen >= RBUF) {
                    fail(h, "bad_response", "headers too long");
                    return;
                }
                r = SSL_read(h->ssl, h->rbuf + h->rlen, RBUF - h->rlen);
                if (r <= 0) {
                    ssl_trouble(h, r);
                    return;
                }
                size_t old = h->rlen, at = old > 3 ? old - 3 : 0;
                h->rlen = (uint16_t)(h->rlen + r);
                char *blank = memmem(h->rbuf + at, h->rlen - at, "\r\n\r\n", 4);
                if (!blank) break;
                if (parse_head(h, (size_t)(blank - h->rbuf) + 4) < 0) {
                    fail(h, "bad_response", NULL);
                    return;
                }
                h->hdr_done = 1;
                break;
            }
            r = SSL_read(h->ssl, scratch,
                         h->body_left < (int64_t)sizeof scratch ? (int)h->body_left
                                                                 : (int)sizeof scratch);
            if (r <= 0) {
                ssl_trouble(h, r);
                return;
            }
            h->body_left -= r;
            break;
        case S_IDLE:
            /* A kept connection between requests: the server closed it (or sent what it
             * should not have): drop it, and the next slot reconnects. A session ticket is
             * read here too, and leaves it waiting. */
            errno = 0;
            r = SSL_read(h->ssl, scratch, sizeof scratch);
            if (r <= 0) {
                int e = SSL_get_error(h->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
            }
            ERR_clear_error();
            conn_close(h);
            rearm(h);
            return;
        default:
            return;
        }
}

/* The host's timer is due: its slot (send, or missed if its previous request still waits),
 * or the deadline of its request in flight. */
static void host_timer(host_t *h, int64_t now) {
    if (h->scheduled && h->due < C.to && h->due <= now) {
        int64_t intended = h->due;
        h->due += C.interval;
        if (BUSY(h)) {
            if (intended >= C.from && intended < C.to) C.missed++;
            rearm(h);
        } else {
            start_request(h, intended, 0);
        }
        return;
    }
    if (BUSY(h) && h->deadline <= now) {
        fail(h, "timed out", NULL);
        return;
    }
    rearm(h);
}

static void load_hosts(void) {
    char path[PATH_MAX];
    for (int k = 0; k < C.count; k++) {
        host_t *h = &C.hosts[k];
        h->index = C.first + k;
        h->fd = -1;
        h->heap_pos = -1;
        snprintf(path, sizeof path, "%s/hosts/%05d.pem", opt.fleet, h->index);
        BIO *bio = BIO_new_file(path, "r");
        if (!bio) die("%s: %s", path, strerror(errno));
        h->cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        (void)BIO_reset(bio);
        h->key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
        BIO_free(bio);
        if (!h->cert || !h->key) die("%s: no certificate and private key in it", path);
        if (X509_check_private_key(h->cert, h->key) != 1)
            die("%s: the private key does not match the certificate", path);
    }
    ERR_clear_error();
}

static SSL_CTX *client_ctx(const char *ca) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) die("SSL_CTX_new failed");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
        char detail[160] = "";
        ERR_error_string_n(ERR_peek_error(), detail, sizeof detail);
        die("%s: not a CA certificate (%s)", ca, detail);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(ctx), "127.0.0.1") != 1)
        die("X509_VERIFY_PARAM_set1_ip_asc failed");
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN);
    SSL_CTX_set_read_ahead(ctx, 1); /* a record's header and body in one read(2) */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    return ctx;
}

static void build_request(void) {
    /* JSON.stringify of heartbeat.mjs's body, with --version escaped */
    size_t vl = strlen(opt.version);
    char *ver = xmalloc(vl * 6 + 1), *q = ver;
    for (const unsigned char *s = (const unsigned char *)opt.version; *s; s++) {
        if (*s == '"' || *s == '\\') {
            *q++ = '\\';
            *q++ = (char)*s;
        } else if (*s < 0x20) {
            q += sprintf(q, "\\u%04x", *s);
        } else {
            *q++ = (char)*s;
        }
    }
    *q = 0;
    size_t cap = strlen(ver) + 512;
    char *body = xmalloc(cap);
    int blen = snprintf(body, cap,
                        "{\"memory_mb\":65536,\"storage_mib\":512000,\"cpus\":16,\"healthy\":true,"
                        "\"checks\":{\"storage_writable\":true,\"docker\":true},"
                        "\"version\":\"%s\",\"instances\":[]}",
                        ver);
    C.req = xmalloc(cap + 256);
    C.reqlen = snprintf(C.req, cap + 256,
                        "POST /api/v1/agent/heartbeat HTTP/1.1\r\n"
                        "Host: 127.0.0.1:%d\r\n"
                        "Content-Type: application/json\r\n"
                        "Content-Length: %d\r\n"
                        "\r\n%s",
                        opt.port, blen, body);
    free(ver);
    free(body);
}

static int wait_events(struct epoll_event *evs, int64_t timeout_ns) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
    if (C.use_pwait2) {
        struct timespec ts = {.tv_sec = timeout_ns / NS, .tv_nsec = timeout_ns % NS};
        int n = epoll_pwait2(C.ep, evs, MAXEV, &ts, NULL);
        if (n >= 0 || errno != ENOSYS) return n;
        C.use_pwait2 = 0;
    }
#endif
    int64_t ms = (timeout_ns + 999999) / 1000000; /* rounded up: never early */
    return epoll_wait(C.ep, evs, MAXEV, ms > INT_MAX ? INT_MAX : (int)ms);
}

static void send_results(void) {
    qsort(C.loop.v, C.loop.n, sizeof(double), cmp_double);
    result_head rh = {.magic = MAGIC_RESULT, .nfail = C.nfail, .nlat = C.lat.n, .nlag = C.lag.n,
                      .nslow = C.nslow, .missed = C.missed};
    if (C.cpu_from_taken && C.cpu_to_taken) rh.cpu_s = (double)(C.cpu_to - C.cpu_from) / 1e9;
    rh.loop_p99_ms = percentile(C.loop.v, C.loop.n, 99);
    rh.loop_max_ms = percentile(C.loop.v, C.loop.n, 100);
    if (write_full(C.up, &rh, sizeof rh) ||
        (C.lat.n && write_full(C.up, C.lat.v, C.lat.n * sizeof(double))) ||
        (C.lag.n && write_full(C.up, C.lag.v, C.lag.n * sizeof(double))) ||
        (C.nslow && write_full(C.up, C.slow, C.nslow * sizeof *C.slow)) ||
        (C.nfail && write_full(C.up, C.fails, C.nfail * sizeof(fail_t)))) {
        fprintf(stderr, "heartbeat: process %d: cannot send results: %s\n", C.id, strerror(errno));
        exit(1);
    }
}

static void control_message(void) {
    window_msg w;
    if (read_full(C.down, &w, sizeof w) || w.magic != MAGIC_WINDOW) {
        fprintf(stderr, "heartbeat: process %d: the parent went away\n", C.id);
        exit(1);
    }
    C.from = w.from;
    C.to = w.to;
    C.end = w.to + C.interval + NS;
    C.nslow = (size_t)ceil((double)(w.to - w.from) / 1e9) + 1;
    C.slow = xmalloc(C.nslow * sizeof *C.slow);
    double slots = (double)C.count * ((double)(w.to - w.from) / (double)C.interval + 2);
    vec_reserve(&C.lat, (size_t)slots);
    vec_reserve(&C.lag, (size_t)slots);
    epoll_ctl(C.ep, EPOLL_CTL_DEL, C.down, NULL);
}

static void child_main(int id, int first, int count, int up, int down) {
    C.id = id;
    C.first = first;
    C.count = count;
    C.up = up;
    C.down = down;
    C.interval = (int64_t)(opt.interval_s * 1e9 + 0.5);
    C.from = C.to = C.end = NEVER;
    C.use_pwait2 = 1;
    C.rng = (uint64_t)mono_ns() ^ ((uint64_t)getpid() << 32) ^
            (uint64_t)first * 0x9e3779b97f4a7c15ULL;
    C.dst.sin_family = AF_INET;
    C.dst.sin_port = htons((uint16_t)opt.port);
    C.dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    C.ctx = client_ctx(opt.ca);
    C.hosts = xmalloc((size_t)(count ? count : 1) * sizeof *C.hosts);
    C.heap = xmalloc((size_t)(count ? count : 1) * sizeof *C.heap);
    load_hosts();
    build_request();

    C.ep = epoll_create1(EPOLL_CLOEXEC);
    if (C.ep < 0) die("epoll_create1: %s", strerror(errno));
    struct epoll_event cev = {.events = EPOLLIN};
    cev.data.u64 = CONTROL_TAG;
    if (epoll_ctl(C.ep, EPOLL_CTL_ADD, down, &cev) < 0) die("epoll_ctl: %s", strerror(errno));

    static struct epoll_event evs[MAXEV];
    C.connect_started = mono_ns();
    int64_t progress = C.connect_started + 10 * NS;
    for (;;) {
        int64_t now = mono_ns();
        if (!C.cpu_from_taken && now >= C.from) {
            C.cpu_from = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
            C.cpu_from_taken = 1;
            getrusage(RUSAGE_SELF, &C.ru_from);
            C.wakeups_from = C.wakeups;
            C.events_from = C.events;
        }
        if (!C.cpu_to_taken && now >= C.to) {
            C.cpu_to = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
            C.cpu_to_taken = 1;
            getrusage(RUSAGE_SELF, &C.ru_to);
            C.wakeups_to = C.wakeups;
            C.events_to = C.events;
        }
        if (now >= C.end) break;
        if (C.heap_n && C.heap[0].wake <= now) {
            int64_t due = C.heap[0].wake; /* how late this loop runs its timers */
            if (due >= C.from && due < C.to) vec_push(&C.loop, (double)(now - due) / 1e6);
            while (C.heap_n && C.heap[0].wake <= now) host_timer(&C.hosts[C.heap[0].host], now);
        }
        if (!C.connect_reported) {
            /* connect CONNECTING at a time (a synchronous failure just lets the next one in) */
            while (C.connect_inflight < opt.connecting && C.connect_next < C.count) {
                host_t *h = &C.hosts[C.connect_next++];
                C.connect_inflight++;
                start_request(h, mono_ns(), 1);
            }
            now = mono_ns();
            if (C.connect_done == C.count) {
                connected_msg m = {.magic = MAGIC_CONNECTED, .connected = (uint64_t)C.count,
                                   .connect_failed = (uint64_t)C.connect_failed};
                if (write_full(up, &m, sizeof m)) exit(1);
                C.connect_reported = 1;
                fprintf(stderr, "heartbeat: process %d: %d hosts connected in %.1f s (%d failed)\n",
                        id, C.count, (double)(now - C.connect_started) / 1e9, C.connect_failed);
            } else if (now >= progress) {
                fprintf(stderr, "heartbeat: process %d: %d/%d hosts connected (%d failed)\n", id,
                        C.connect_done, C.count, C.connect_failed);
                progress += 10 * NS;
            }
        }
        int64_t next = C.end;
        if (C.heap_n && C.heap[0].wake < next) next = C.heap[0].wake;
        if (!C.cpu_from_taken && C.from < next) next = C.from;
        if (!C.cpu_to_taken && C.to < next) next = C.to;
        if (!C.connect_reported && progress < next) next = progress;
        now = mono_ns();
        int64_t timeout = next <= now ? 0 : next - now;
        if (timeout > 3600 * NS) timeout = 3600 * NS;
        int n = wait_events(evs, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait: %s", strerror(errno));
        }
        C.wakeups++;
        C.events += (uint64_t)n;
        for (int k = 0; k < n; k++) {
            uint64_t tag = evs[k].data.u64;
            if (tag == CONTROL_TAG) {
                control_message();
                continue;
            }
            host_t *h = &C.hosts[(uint32_t)tag];
            if ((uint32_t)(tag >> 32) != h->gen) continue; /* a connection since closed */
            drive(h, evs[k].events);
        }
    }

    if (C.cpu_to_taken) {
        /* for whoever wonders where this generator's CPU goes */
        double us = (double)(C.ru_to.ru_utime.tv_sec - C.ru_from.ru_utime.tv_sec) * 1e6 +
                    (double)(C.ru_to.ru_utime.tv_usec - C.ru_from.ru_utime.tv_usec);
        double sy = (double)(C.ru_to.ru_stime.tv_sec - C.ru_from.ru_stime.tv_sec) * 1e6 +
                    (double)(C.ru_to.ru_stime.tv_usec - C.ru_from.ru_stime.tv_usec);
        double beats = C.lag.n ? (double)C.lag.n : 1;
        fprintf(stderr,
                "heartbeat: process %d: in the window, per heartbeat: %.1f us user, %.1f us "
                "system, %.2f loop wakeups, %.2f socket events\n",
                C.id, us / beats, sy / beats, (double)(C.wakeups_to - C.wakeups_from) / beats,
                (double)(C.events_to - C.events_from) / beats);
    }
    send_results();
    close(up);
    for (int k = 0; k < C.count; k++) {
        host_t *h = &C.hosts[k];
        if (h->ssl && h->state == S_IDLE) SSL_shutdown(h->ssl); /* close_notify, no waiting */
        conn_close(h);
        X509_free(h->cert);
        EVP_PKEY_free(h->key);
    }
    ERR_clear_error();
    SSL_CTX_free(C.ctx);
    free(C.hosts);
    free(C.heap);
    free(C.req);
    free(C.slow);
    free(C.lat.v);
    free(C.lag.v);
    free(C.loop.v);
    close(C.ep);
    exit(0);
}

/* ---------------------------------------------------------------- the parent */

/* utime + stime of the process and every process under it, in seconds */
static double coordinator_cpu_s(long pid) {
    long hz = sysconf(_SC_CLK_TCK);
    size_t n = 0, cap = 64;
    long *todo = xmalloc(cap * sizeof *todo);
    todo[n++] = pid;
    double total = 0;
    char path[64], buf[4096];
    for (size_t i = 0; i < n; i++) {
        long p = todo[i];
        snprintf(path, sizeof path, "/proc/%ld/stat", p);
        FILE *f = fopen(path, "r");
        if (!f) continue; /* a process that ended */
        size_t len = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[len] = 0;
        char *s = strrchr(buf, ')');
        if (!s) continue;
        s += 2; /* fields from 3 (state) on; utime and stime are 14 and 15 */
        unsigned long long utime = 0, stime = 0;
        if (sscanf(s, "%*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %llu %llu", &utime, &stime) != 2)
            continue;
        total += (double)(utime + stime) / (double)hz;
        snprintf(path, sizeof path, "/proc/%ld/task", p);
        DIR *d = opendir(path);
        if (!d) continue;
        struct dirent *de;
        while ((de = readdir(d))) {
            if (de->d_name[0] == '.') continue;
            char cpath[600];
            snprintf(cpath, sizeof cpath, "/proc/%ld/task/%s/children", p, de->d_name);
            FILE *cf = fopen(cpath, "r");
            if (!cf) continue;
            long kid;
            while (fscanf(cf, "%ld", &kid) == 1) {
                if (n == cap) {
                    cap *= 2;
                    long *t = realloc(todo, cap * sizeof *t);
                    if (!t) die("out of memory");
                    todo = t;
                }
                todo[n++] = kid;
            }
            fclose(cf);
        }
        closedir(d);
    }
    free(todo);
    return total;
}

static void sleep_until(int64_t t) {
    struct timespec ts = {.tv_sec = t / NS, .tv_nsec = t % NS};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static pid_t *kids;
static int nkids;

static void kill_children(void) {
    for (int n = 0; n < nkids; n++)
        if (kids[n] > 0) kill(kids[n], SIGKILL);
    for (int n = 0; n < nkids; n++)
        if (kids[n] > 0) waitpid(kids[n], NULL, 0);
}

static void child_lost(int n, const char *when) {
    int status = 0;
    fprintf(stderr, "heartbeat: process %d ended %s\n", n, when);
    if (kids[n] > 0 && waitpid(kids[n], &status, 0) == kids[n]) kids[n] = 0;
    kill_children();
    exit(WIFEXITED(status) && WEXITSTATUS(status) == 2 ? 2 : 1);
}

static void parse_args(int argc, char **argv) {
    static const struct option longopts[] = {
        {"fleet", required_argument, 0, 'f'},    {"ca", required_argument, 0, 'a'},
        {"port", required_argument, 0, 'p'},     {"hosts", required_argument, 0, 'n'},
        {"interval", required_argument, 0, 'i'}, {"seconds", required_argument, 0, 's'},
        {"processes", required_argument, 0, 'P'}, {"version", required_argument, 0, 'v'},
        {"coordinator-pid", required_argument, 0, 'c'},
        {"connecting", required_argument, 0, 'k'}, {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int have_port = 0, have_hosts = 0, c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        const char *name = NULL;
        for (const struct option *o = longopts; o->name; o++)
            if (o->val == c) name = o->name;
        char *end = NULL;
        long lv = 0;
        double dv = 0;
        errno = 0;
        if (c == 'p' || c == 'n' || c == 'P' || c == 'c' || c == 'k') {
            lv = strtol(optarg, &end, 10);
            if (errno || end == optarg || *end)
                usage_error("--%s: not an integer: '%s'", name, optarg);
        } else if (c == 'i' || c == 's') {
            dv = strtod(optarg, &end);
            if (errno || end == optarg || *end || !(dv > 0) || dv > 1e6)
                usage_error("--%s: expected a positive number of seconds, got '%s'", name, optarg);
        }
        switch (c) {
        case 'f': opt.fleet = optarg; break;
        case 'a': opt.ca = optarg; break;
        case 'v': opt.version = optarg; break;
        case 'i': opt.interval_s = dv; break;
        case 's': opt.seconds = dv; break;
        case 'p':
            if (lv < 1 || lv > 65535) usage_error("--port: expected 1..65535, got %ld", lv);
            opt.port = (int)lv;
            have_port = 1;
            break;
        case 'n':
            if (lv < 1 || lv > MAX_HOSTS)
                usage_error("--hosts: expected 1..%d, got %ld", MAX_HOSTS, lv);
            opt.hosts = lv;
            have_hosts = 1;
            break;
        case 'P':
            if (lv < 1 || lv > 1024) usage_error("--processes: expected 1..1024, got %ld", lv);
            opt.processes = (int)lv;
            break;
        case 'c':
            if (lv < 1 || lv > INT_MAX) usage_error("--coordinator-pid: not a pid: %ld", lv);
            opt.coordinator_pid = lv;
            break;
        case 'k':
            if (lv < 1 || lv > 100000) usage_error("--connecting: expected 1..100000, got %ld", lv);
            opt.connecting = (int)lv;
            break;
        case 'h': fputs(USAGE, stdout); exit(0);
        default: fputs(USAGE, stderr); exit(2);
        }
    }
    if (optind < argc) usage_error("unexpected argument '%s'", argv[optind]);
    if (!opt.fleet) usage_error("--fleet is required");
    if (!have_port) usage_error("--port is required");
    if (!have_hosts) usage_error("--hosts is required");
    if (opt.interval_s < 0.001) usage_error("--interval: at least 0.001 s");
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);

    /* the setup, checked here so that a bad fleet fails at once and plainly */
    static char ca_path[PATH_MAX];
    if (!opt.ca) {
        snprintf(ca_path, sizeof ca_path, "%s/storage/coordinator/ca.crt", opt.fleet);
        opt.ca = ca_path;
    }
    struct stat st;
    if (stat(opt.fleet, &st) < 0 || !S_ISDIR(st.st_mode))
        die("--fleet %s: not a directory", opt.fleet);
    if (access(opt.ca, R_OK) < 0) die("%s: %s", opt.ca, strerror(errno));
    SSL_CTX_free(client_ctx(opt.ca));
    for (long i = 0; i < opt.hosts; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/hosts/%05ld.pem", opt.fleet, i);
        if (access(path, R_OK) < 0)
            die("%s: %s (the fleet has fewer than %ld hosts?)", path, strerror(errno), opt.hosts);
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    long per = (opt.hosts + PER_PROCESS - 1) / PER_PROCESS;
    int processes = opt.processes > per ? opt.processes : (int)per;
    long biggest = (opt.hosts + processes - 1) / processes;
    if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)biggest + 64 > rl.rlim_cur)
        die("the open-files limit (%llu) is too low for %ld connections per process: use more "
            "--processes", (unsigned long long)rl.rlim_cur, biggest);

    /* the children, each with a contiguous slice of the hosts */
    kids = xmalloc((size_t)processes * sizeof *kids);
    int *ups = xmalloc((size_t)processes * sizeof *ups);
    int *downs = xmalloc((size_t)processes * sizeof *downs);
    pid_t parent = getpid();
    fprintf(stderr, "heartbeat: %ld hosts in %d processes, connecting %d at a time each\n",
            opt.hosts, processes, opt.connecting);
    for (int n = 0; n < processes; n++) {
        int first = (int)(((int64_t)n * opt.hosts) / processes);
        int count = (int)(((int64_t)(n + 1) * opt.hosts) / processes) - first;
        int up[2], down[2];
        if (pipe2(up, O_CLOEXEC) < 0 || pipe2(down, O_CLOEXEC) < 0)
            die("pipe: %s", strerror(errno));
        fflush(stdout);
        fflush(stderr);
        pid_t pid = fork();
        if (pid < 0) {
            kill_children();
            die("fork: %s", strerror(errno));
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) _exit(1);
            for (int m = 0; m < n; m++) {
                close(ups[m]);
                close(downs[m]);
            }
            free(kids);
            free(ups);
            free(downs);
            close(up[0]);
            close(down[1]);
            child_main(n, first, count, up[1], down[0]);
        }
        kids[n] = pid;
        nkids = n + 1;
        close(up[1]);
        close(down[0]);
        ups[n] = up[0];
        downs[n] = down[1];
    }

    /* every host connected: the window */
    uint64_t connected = 0, connect_failed = 0;
    for (int n = 0; n < processes; n++) {
        connected_msg m;
        if (read_full(ups[n], &m, sizeof m) || m.magic != MAGIC_CONNECTED)
            child_lost(n, "while connecting");
        connected += m.connected;
        connect_failed += m.connect_failed;
    }
    int64_t interval = (int64_t)(opt.interval_s * 1e9 + 0.5);
    int64_t from = mono_ns() + interval + SETTLE_S * NS;
    int64_t to = from + (int64_t)(opt.seconds * 1e9 + 0.5);
    double from_unix = (double)(from + clock_ns(CLOCK_REALTIME) - mono_ns()) / 1e9;
    window_msg w = {.magic = MAGIC_WINDOW, .from = from, .to = to};
    for (int n = 0; n < processes; n++)
        if (write_full(downs[n], &w, sizeof w)) child_lost(n, "before the window");
    fprintf(stderr, "heartbeat: %" PRIu64 " hosts connected (%" PRIu64 " failed); the window "
            "starts in %.1f s and lasts %g s\n", connected, connect_failed,
            (double)(from - mono_ns()) / 1e9, opt.seconds);
    double coordinator = 0;
    if (opt.coordinator_pid) {
        sleep_until(from);
        double before = coordinator_cpu_s(opt.coordinator_pid);
        sleep_until(to);
        coordinator = coordinator_cpu_s(opt.coordinator_pid) - before;
        if (coordinator < 0) coordinator = 0; /* it ended within the window */
    }

    /* the children's results */
    vec_t lat = {0}, lag = {0};
    double (*slow)[2] = NULL;
    size_t nslow = 0;
    fail_t fails[NFAIL];
    uint32_t nfail = 0;
    uint64_t missed = 0;
    double cpu_s = 0, loop_p99 = 0, loop_max = 0;
    for (int n = 0; n < processes; n++) {
        result_head rh;
        if (read_full(ups[n], &rh, sizeof rh) || rh.magic != MAGIC_RESULT || rh.nfail > NFAIL)
            child_lost(n, "before sending its results");
        vec_reserve(&lat, lat.n + rh.nlat + 1);
        vec_reserve(&lag, lag.n + rh.nlag + 1);
        double (*s)[2] = xmalloc((rh.nslow ? rh.nslow : 1) * sizeof *s);
        fail_t f[NFAIL];
        if ((rh.nlat && read_full(ups[n], lat.v + lat.n, rh.nlat * sizeof(double))) ||
            (rh.nlag && read_full(ups[n], lag.v + lag.n, rh.nlag * sizeof(double))) ||
            (rh.nslow && read_full(ups[n], s, rh.nslow * sizeof *s)) ||
            (rh.nfail && read_full(ups[n], f, rh.nfail * sizeof(fail_t))))
            child_lost(n, "while sending its results");
        lat.n += rh.nlat;
        lag.n += rh.nlag;
        if (rh.nslow > nslow) {
            double (*t)[2] = realloc(slow, rh.nslow * sizeof *t);
            if (!t) die("out of memory");
            memset(t + nslow, 0, (rh.nslow - nslow) * sizeof *t);
            slow = t;
            nslow = rh.nslow;
        }
        for (size_t k = 0; k < rh.nslow; k++) {
            slow[k][0] += s[k][0];
            if (s[k][1] > slow[k][1]) slow[k][1] = s[k][1];
        }
        free(s);
        for (uint32_t k = 0; k < rh.nfail; k++) {
            f[k].key[sizeof f[k].key - 1] = 0;
            fail_add(fails, &nfail, f[k].key, f[k].n);
        }
        missed += rh.missed;
        cpu_s += rh.cpu_s;
        if (n == 0 || rh.loop_p99_ms > loop_p99) loop_p99 = rh.loop_p99_ms;
        if (n == 0 || rh.loop_max_ms > loop_max) loop_max = rh.loop_max_ms;
    }
    for (int n = 0; n < processes; n++) {
        int status;
        if (waitpid(kids[n], &status, 0) == kids[n] && !(WIFEXITED(status) && !WEXITSTATUS(status)))
            fprintf(stderr, "heartbeat: process %d ended badly (status %d)\n", n, status);
        close(ups[n]);
        close(downs[n]);
    }

    qsort(lat.v, lat.n, sizeof(double), cmp_double);
    qsort(lag.v, lag.n, sizeof(double), cmp_double);
    size_t count = lat.n;
    uint64_t failed = 0;
    for (uint32_t k = 0; k < nfail; k++) failed += fails[k].n;
    double per_beat = count ? (double)count : 1;

    char gen[160];
    snprintf(gen, sizeof gen, "c openssl %s", OpenSSL_version(OPENSSL_VERSION));
    printf("{\"generator\":");
    jstr(gen);
    printf(",\"hosts\":%ld,\"processes\":%d,\"interval_s\":", opt.hosts, processes);
    jnum(opt.interval_s);
    printf(",\"window_s\":");
    jnum(opt.seconds);
    printf(",\"window_from_unix_s\":");
    jnum(round2(from_unix));
    printf(",\"connected\":%" PRIu64 ",\"connect_failed\":%" PRIu64, connected, connect_failed);
    printf(",\"heartbeats\":%zu,\"rate\":%ld", count, jsround((double)count / opt.seconds));
    printf(",\"p50_ms\":");
    jnum(round2(percentile(lat.v, count, 50)));
    printf(",\"p99_ms\":");
    jnum(round2(percentile(lat.v, count, 99)));
    printf(",\"p999_ms\":");
    jnum(round2(percentile(lat.v, count, 99.9)));
    printf(",\"max_ms\":");
    jnum(round2(percentile(lat.v, count, 100)));
    printf(",\"failed\":%" PRIu64 ",\"failures\":", failed);
    print_failures(fails, nfail);
    printf(",\"missed\":%" PRIu64 ",\"generator_cpu_s\":", missed);
    jnum(round4(cpu_s));
    printf(",\"generator_cpu_us_per_heartbeat\":%ld", jsround(cpu_s / per_beat * 1e6));
    printf(",\"generator_send_lag_ms\":{\"p99\":");
    jnum(round2(percentile(lag.v, lag.n, 99)));
    printf(",\"max\":");
    jnum(round2(percentile(lag.v, lag.n, 100)));
    printf("},\"generator_loop_delay_ms\":{\"p99\":");
    jnum(round2(loop_p99));
    printf(",\"max\":");
    jnum(round2(loop_max));
    printf("},\"seconds_with_heartbeats_over_%d_ms\":{", SLOW_MS);
    int comma = 0;
    for (size_t k = 0; k < nslow; k++) {
        if (slow[k][0] == 0) continue;
        printf("%s\"%zu\":[", comma ? "," : "", k);
        jnum(slow[k][0]);
        putchar(',');
        jnum(round2(slow[k][1]));
        putchar(']');
        comma = 1;
    }
    putchar('}');
    if (opt.coordinator_pid) {
        printf(",\"coordinator_cpu_s\":");
        jnum(round2(coordinator));
        printf(",\"coordinator_cpu_us_per_heartbeat\":%ld", jsround(coordinator / per_beat * 1e6));
    }
    printf("}\n");
    fflush(stdout);
    free(lat.v);
    free(lag.v);
    free(slow);
    free(kids);
    free(ups);
    free(downs);
    return 0;
}

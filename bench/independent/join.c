/* An independent join load generator for a Muster coordinator in C (C11, OpenSSL 3, POSIX
 * threads): new hosts joining with a roles token by the agent's own sequence, written from the
 * wire protocol and docs/ alone (muster.agent.join's docstring is the specification). Each
 * join is a new host, from its own 127.x.y.z address:
 *
 *   1. a new TLS connection that verifies nothing yet; GET /api/v1/agent/ca on it;
 *   2. the CA's SubjectPublicKeyInfo SHA-256 must equal the token's ca_fingerprint claim, and
 *      the certificate this connection's server presented must be that CA's, for 127.0.0.1, a
 *      server certificate valid now; else the token is not sent;
 *   3. a new ECDSA P-256 key and a CSR for it, CN = the runner id;
 *   4. POST /api/v1/agent/join on the same connection: the token, the CSR and the host's facts;
 *      a join counts once its 200 reply, naming the runner and holding a certificate, is read.
 *
 * Latency is the whole sequence, connection and key included. Closed loop: --concurrency
 * threads, each joining one host after another (blocking sockets), until --joins have been
 * tried. Prints one line of JSON: joined, seconds, generator_cpu_s (getrusage of this process,
 * all threads), latency_s (every join's, unsorted), failures by reason.
 *
 *   gcc -O2 -Wall -Wextra -pthread -o join bench/independent/join.c -lssl -lcrypto -lm
 *   ./join --port PORT --token-file FILE --joins 2000 [--concurrency 64] [--prefix cj]
 *     [--first-index 0]
 *
 * What the agent does that this does not: write the key and certificate to disk, and accept a
 * previous CA named in the reply's ca_certificates (during a rotation); the coordinator sees
 * the same requests either way. */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

static const char USAGE[] =
    "usage: join --port PORT --token-file FILE --joins N [--concurrency C] [--prefix P]\n"
    "            [--first-index I]\n";

#define PROGRAM "join"
#include "generator.h"

#define CA_PATH "/api/v1/agent/ca"
#define JOIN_PATH "/api/v1/agent/join"
#define TIMEOUT_S 60
#define MAX_REPLY (1 << 20)

static struct {
    const char *token_file, *prefix;
    int port, concurrency;
    long joins, first;
} opt = {.prefix = "cj", .concurrency = 64};

static char *token;    /* the roles token, as read */
static char pin[65];   /* the token's ca_fingerprint: lowercase hex, no prefix or colons */
static SSL_CTX *ctx;   /* verifies nothing: the pin and the check after it do */
static struct sockaddr_in coordinator;
static atomic_long next_join;

static pthread_mutex_t results_lock = PTHREAD_MUTEX_INITIALIZER;
static vec_t latency;
static fail_t fails[NFAIL];
static uint32_t nfail;

static void failed(const char *reason) {
    pthread_mutex_lock(&results_lock);
    fail_add(fails, &nfail, reason, 1);
    pthread_mutex_unlock(&results_lock);
}

/* ---------------------------------------------------------------- JSON, and the token's pin */

/* The JSON string value of `key` in `json`, unescaped into a new buffer (NULL if absent). */
static char *json_string(const char *json, const char *key) {
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *p = strstr(json, quoted);
    if (!p) return NULL;
    p += strlen(quoted);
    while (*p == ' ' || *p == ':') p++;
    if (*p++ != '"') return NULL;
    char *out = xmalloc(strlen(p) + 1), *o = out;
    for (; *p && *p != '"'; p++) {
        if (*p != '\\') {
            *o++ = *p;
            continue;
        }
        switch (*++p) {
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': /* ASCII only: a PEM needs no more */
            if (strlen(p) < 5) goto bad;
            *o++ = (char)strtol((char[]){p[1], p[2], p[3], p[4], 0}, NULL, 16);
            p += 4;
            break;
        case 0: goto bad;
        default: *o++ = *p; /* \" \\ \/ */
        }
    }
    if (*p == '"') {
        *o = 0;
        return out;
    }
bad:
    free(out);
    return NULL;
}

/* The claim `name` of a JWT's payload, read without verifying it (the agent's
 * read_unverified_claims): a new buffer, NULL if absent or not a string. */
static char *jwt_claim(const char *jwt, const char *name) {
    const char *dot = strchr(jwt, '.'), *end = dot ? strchr(dot + 1, '.') : NULL;
    if (!end) return NULL;
    size_t n = (size_t)(end - dot - 1);
    char *b64 = xmalloc(n + 4), *json = xmalloc(n + 4);
    for (size_t i = 0; i < n; i++) { /* base64url -> base64, padded */
        char c = dot[1 + i];
        b64[i] = c == '-' ? '+' : c == '_' ? '/' : c;
    }
    while (n % 4) b64[n++] = '=';
    int len = EVP_DecodeBlock((unsigned char *)json, (unsigned char *)b64, (int)n);
    char *claim = NULL;
    if (len > 0) {
        json[len] = 0;
        claim = json_string(json, name);
    }
    free(b64);
    free(json);
    return claim;
}

static void read_pin(void) {
    char *claim = jwt_claim(token, "ca_fingerprint"), *p = claim;
    if (!claim) die("the token has no ca_fingerprint");
    if (!strncasecmp(p, "sha256:", 7)) p += 7;
    size_t n = 0;
    for (; *p && n < sizeof pin - 1; p++)
        if (*p != ':') pin[n++] = (char)(*p >= 'A' && *p <= 'F' ? *p + 32 : *p);
    pin[n] = 0;
    free(claim);
    if (n != 64) die("the token's ca_fingerprint is not a SHA-256");
}

/* ---------------------------------------------------------------- one connection */

typedef struct {
    SSL *ssl;
    int fd;
    char *buf; /* the reply: head and body */
    size_t len, cap;
    int status;
    const char *body;
    size_t body_len;
} conn_t;

static const char *tls_error(void) {
    static _Thread_local char detail[120];
    unsigned long e = ERR_get_error();
    ERR_clear_error();
    if (!e) return errno ? strerrorname_np(errno) : "tls: closed";
    snprintf(detail, sizeof detail, "tls: %s", ERR_reason_error_string(e));
    return detail;
}

/* A new TCP connection from host `index`'s address and the TLS handshake on it. */
static const char *conn_open(conn_t *c, long index) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) return strerrorname_np(errno);
    int one = 1;
    struct timeval tv = {.tv_sec = TIMEOUT_S};
    setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    /* bench.agentjoin.local_ip: one loopback address per host */
    uint32_t i = (uint32_t)index;
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl((127u << 24) | ((i / 8000 + 1) << 16) | (((i / 250) % 32) << 8) |
                                (i % 250 + 1));
    if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) return strerrorname_np(errno);
    if (connect(c->fd, (struct sockaddr *)&coordinator, sizeof coordinator) < 0)
        return strerrorname_np(errno);
    c->ssl = SSL_new(ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) return tls_error();
    errno = 0;
    if (SSL_connect(c->ssl) != 1) return tls_error();
    return NULL;
}

static void conn_close(conn_t *c) {
    if (c->ssl) SSL_free(c->ssl); /* as the agent's socket closes: no close_notify */
    if (c->fd >= 0) close(c->fd);
    c->ssl = NULL;
    c->fd = -1;
}

/* Send one request and read its reply (Content-Length framed) into c->buf. */
static const char *call(conn_t *c, const char *request, size_t n) {
    errno = 0;
    if (SSL_write(c->ssl, request, (int)n) != (int)n) return tls_error();
    c->len = 0;
    size_t need = 0, head = 0;
    for (;;) {
        if (c->len == c->cap) {
            if (c->cap >= MAX_REPLY) return "reply too large";
            c->cap = c->cap ? c->cap * 2 : 16384;
            c->buf = realloc(c->buf, c->cap + 1);
            if (!c->buf) die("out of memory");
        }
        errno = 0;
        int r = SSL_read(c->ssl, c->buf + c->len, (int)(c->cap - c->len));
        if (r <= 0) return tls_error();
        c->len += (size_t)r;
        c->buf[c->len] = 0;
        if (!head) {
            char *end = strstr(c->buf, "\r\n\r\n");
            if (!end) continue;
            head = (size_t)(end - c->buf) + 4;
            if (sscanf(c->buf, "HTTP/1.%*c %d", &c->status) != 1) return "reply: no status line";
            const char *cl = strcasestr(c->buf, "\r\ncontent-length:");
            if (!cl || cl > end) return "reply: no content-length";
            need = head + strtoul(cl + 17, NULL, 10);
        }
        if (c->len >= need) break;
    }
    c->body = c->buf + head;
    c->body_len = need - head;
    c->buf[need] = 0;
    return NULL;
}

/* ---------------------------------------------------------------- the checks */

static int pinned(X509 *ca) {
    unsigned char *der = NULL, md[SHA256_DIGEST_LENGTH];
    int n = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(ca), &der);
    if (n <= 0) return 0;
    SHA256(der, (size_t)n, md);
    OPENSSL_free(der);
    char hex[65];
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return !strcmp(hex, pin);
}

/* The server's certificate: issued by `ca`, for 127.0.0.1, for a TLS server, valid now. */
static int server_trusted(SSL *ssl, X509 *ca) {
    X509 *leaf = SSL_get0_peer_certificate(ssl);
    X509_STORE *store = X509_STORE_new();
    X509_STORE_CTX *xs = X509_STORE_CTX_new();
    int ok = leaf && store && xs && X509_STORE_add_cert(store, ca) == 1 &&
             X509_STORE_CTX_init(xs, store, leaf, NULL) == 1 &&
             X509_STORE_CTX_set_purpose(xs, X509_PURPOSE_SSL_SERVER) == 1 &&
             X509_VERIFY_PARAM_set1_ip_asc(X509_STORE_CTX_get0_param(xs), "127.0.0.1") == 1 &&
             X509_verify_cert(xs) == 1;
    X509_STORE_CTX_free(xs);
    X509_STORE_free(store);
    ERR_clear_error();
    return ok;
}

/* A new key and a PEM CSR for it, JSON-escaped (newlines as \n) into `out`. */
static int csr_json(const char *rid, char *out, size_t size) {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509_REQ *req = X509_REQ_new();
    BIO *mem = BIO_new(BIO_s_mem());
    int ok = key && req && mem &&
             X509_NAME_add_entry_by_txt(X509_REQ_get_subject_name(req), "CN", MBSTRING_ASC,
                                        (const unsigned char *)rid, -1, -1, 0) == 1 &&
             X509_REQ_set_pubkey(req, key) == 1 && X509_REQ_sign(req, key, EVP_sha256()) > 0 &&
             PEM_write_bio_X509_REQ(mem, req) == 1;
    if (ok) {
        char *pem;
        long n = BIO_get_mem_data(mem, &pem);
        size_t o = 0;
        for (long i = 0; i < n && o + 3 < size; i++) {
            if (pem[i] == '\n') {
                out[o++] = '\\';
                out[o++] = 'n';
            } else {
                out[o++] = pem[i];
            }
        }
        out[o] = 0;
        ok = o + 3 < size;
    }
    BIO_free(mem);
    X509_REQ_free(req);
    EVP_PKEY_free(key); /* the agent keeps it; nothing here needs it again */
    return ok;
}

/* ---------------------------------------------------------------- one join */

static const char *ZONES[] = {"ece-zone-1", "ece-zone-2", "ece-zone-3"};

static const char *join_one(conn_t *c, long n, char *request, size_t size) {
    char host[48], rid[64];
    snprintf(host, sizeof host, "127.0.0.1:%d", opt.port);
    snprintf(rid, sizeof rid, "%s-%06ld", opt.prefix, n);
    const char *why = conn_open(c, n);
    if (why) return why;
    int len = snprintf(request, size, "GET " CA_PATH " HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n\r\n",
                       host);
    if ((why = call(c, request, (size_t)len))) return why;
    if (c->status != 200) {
        snprintf(request, size, "ca: http %d", c->status);
        return request;
    }
    char *ca_pem = json_string(c->body, "ca_certificate");
    BIO *bio = ca_pem ? BIO_new_mem_buf(ca_pem, -1) : NULL;
    X509 *ca = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    free(ca_pem);
    if (!ca) return "ca: no certificate in the reply";
    why = !pinned(ca) ? "ca: pin mismatch" : !server_trusted(c->ssl, ca) ? "server certificate refused" : NULL;
    X509_free(ca);
    if (why) return why; /* the token is not sent */

    char csr[1024], body[4096];
    if (!csr_json(rid, csr, sizeof csr)) return "csr";
    uint32_t i = (uint32_t)n;
    int blen = snprintf(
        body, sizeof body,
        "{\"token\":\"%s\",\"csr\":\"%s\",\"runner_id\":\"%s\",\"host_ip\":\"127.%u.%u.%u\","
        "\"zone\":\"%s\",\"public_hostname\":\"\",\"capacity_mb\":65536,\"tags\":{},"
        "\"report\":{\"memory_mb\":65536,\"storage_mib\":512000,\"cpus\":16},"
        "\"roles\":[\"allocator\"]}",
        token, csr, rid, i / 8000 + 1, (i / 250) % 32, i % 250 + 1, ZONES[n % 3]);
    if (blen < 0 || (size_t)blen >= sizeof body) return "join body too large";
    len = snprintf(request, size,
                   "POST " JOIN_PATH " HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n"
                   "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                   host, blen, body);
    if (len < 0 || (size_t)len >= size) return "join request too large";
    if ((why = call(c, request, (size_t)len))) return why;
    if (c->status != 200) {
        snprintf(request, size, "join: http %d", c->status);
        return request;
    }
    char quoted[80];
    snprintf(quoted, sizeof quoted, "\"%s\"", rid);
    if (!strstr(c->body, quoted) || !strstr(c->body, "BEGIN CERTIFICATE")) return "join: unexpected reply";
    return NULL;
}

static void *joiner(void *arg) {
    (void)arg;
    conn_t c = {.fd = -1};
    size_t size = 8192;
    char *request = xmalloc(size);
    for (;;) {
        long k = atomic_fetch_add(&next_join, 1);
        if (k >= opt.joins) break;
        int64_t started = mono_ns();
        const char *why = join_one(&c, opt.first + k, request, size);
        double took = (double)(mono_ns() - started) / NS;
        conn_close(&c);
        if (why) {
            failed(why);
            continue;
        }
        pthread_mutex_lock(&results_lock);
        vec_push(&latency, took);
        pthread_mutex_unlock(&results_lock);
    }
    free(c.buf);
    free(request);
    return NULL;
}

/* ---------------------------------------------------------------- main */

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("%s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *s = xmalloc(cap);
    for (size_t r; (r = fread(s + n, 1, cap - n - 1, f)) > 0;) {
        n += r;
        if (n + 1 == cap && !(s = realloc(s, cap *= 2))) die("out of memory");
    }
    fclose(f);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ')) n--;
    s[n] = 0;
    return s;
}

static void parse_args(int argc, char **argv) {
    static const struct option longs[] = {
        {"port", required_argument, 0, 'p'},        {"token-file", required_argument, 0, 't'},
        {"joins", required_argument, 0, 'j'},       {"concurrency", required_argument, 0, 'c'},
        {"prefix", required_argument, 0, 'x'},      {"first-index", required_argument, 0, 'f'},
        {"help", no_argument, 0, 'h'},              {0, 0, 0, 0}};
    for (int ch; (ch = getopt_long(argc, argv, "", longs, NULL)) != -1;) {
        switch (ch) {
        case 'p': opt.port = atoi(optarg); break;
        case 't': opt.token_file = optarg; break;
        case 'j': opt.joins = atol(optarg); break;
        case 'c': opt.concurrency = atoi(optarg); break;
        case 'x': opt.prefix = optarg; break;
        case 'f': opt.first = atol(optarg); break;
        case 'h': fputs(USAGE, stdout); exit(0);
        default: fputs(USAGE, stderr); exit(2);
        }
    }
    if (opt.port <= 0 || opt.port > 65535) usage_error("--port: a TCP port");
    if (!opt.token_file) usage_error("--token-file is required");
    if (opt.joins <= 0) usage_error("--joins: a positive number");
    if (opt.concurrency <= 0 || opt.concurrency > 4096) usage_error("--concurrency: 1-4096");
    if (opt.first < 0 || opt.first + opt.joins > 2032000) usage_error("--first-index: too large");
    if (strlen(opt.prefix) > 32) usage_error("--prefix: at most 32 characters");
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    token = read_file(opt.token_file);
    if (strlen(token) > 2048 || strpbrk(token, "\"\\")) die("the token file holds no roles token");
    read_pin();
    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) die("SSL_CTX_new failed");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF); /* every host is new */
    coordinator.sin_family = AF_INET;
    coordinator.sin_port = htons((uint16_t)opt.port);
    coordinator.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    pthread_t *threads = xmalloc((size_t)opt.concurrency * sizeof *threads);
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    int64_t started = mono_ns();
    for (int i = 0; i < opt.concurrency; i++)
        if (pthread_create(&threads[i], NULL, joiner, NULL)) die("pthread_create failed");
    for (int i = 0; i < opt.concurrency; i++) pthread_join(threads[i], NULL);
    double seconds = (double)(mono_ns() - started) / NS;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + ru1.ru_stime.tv_sec -
                          ru0.ru_stime.tv_sec) +
                 (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec + ru1.ru_stime.tv_usec -
                          ru0.ru_stime.tv_usec) / 1e6;

    char gen[160];
    snprintf(gen, sizeof gen, "c openssl %s", OpenSSL_version(OPENSSL_VERSION));
    printf("{\"generator\":");
    jstr(gen);
    printf(",\"joined\":%zu,\"seconds\":", latency.n);
    jnum(seconds);
    printf(",\"generator_cpu_s\":");
    jnum(cpu);
    printf(",\"failures\":");
    print_failures(fails, nfail);
    printf(",\"latency_s\":[");
    for (size_t i = 0; i < latency.n; i++) {
        if (i) putchar(',');
        jnum(latency.v[i]);
    }
    printf("]}\n");
    fflush(stdout);
    free(threads);
    free(latency.v);
    free(token);
    SSL_CTX_free(ctx);
    return 0;
}

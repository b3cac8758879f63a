// An independent join load generator for a Muster coordinator in Go (its standard library
// alone: crypto/tls, crypto/x509, net/http's wire format): new hosts joining with a roles token
// by the agent's own sequence, written from the wire protocol and docs/ (muster.agent.join's
// docstring is the specification), sharing no code with bench/ or join.c. Each join is a new
// host, from its own 127.x.y.z address:
//
//  1. a new TLS connection that verifies nothing yet; GET /api/v1/agent/ca on it;
//  2. the CA's SubjectPublicKeyInfo SHA-256 must equal the token's ca_fingerprint claim, and
//     the certificate this connection's server presented must be that CA's, for 127.0.0.1, a
//     server certificate valid now; else the token is not sent;
//  3. a new ECDSA P-256 key and a CSR for it, CN = the runner id;
//  4. POST /api/v1/agent/join on the same connection: the token, the CSR and the host's facts;
//     a join counts once its 200 reply, naming the runner and holding a certificate, is read.
//
// It does what join.c does, through another TLS and X.509 implementation: Go's, whose
// handshakes and certificate parsing cost a host far less CPU than OpenSSL 3.0's on this
// machine, so that less of the shared cores goes to the generator. Latency is the whole
// sequence, connection and key included. Closed loop: --concurrency goroutines, each joining one
// host after another, until --joins have been tried. Prints one line of JSON, as join.c does:
// generator, joined, seconds, generator_cpu_s (getrusage of this process), failures by reason,
// latency_s (every join's, unsorted).
//
//	go build -o join bench/independent/join.go
//	./join --port PORT --token-file FILE --joins 2000 [--concurrency 64] [--prefix gj]
//	  [--first-index 0]
//
// What the agent does that this does not: write the key and certificate to disk, and accept a
// previous CA named in the reply's ca_certificates (during a rotation); the coordinator sees
// the same requests either way.
package main

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	caPath   = "/api/v1/agent/ca"
	joinPath = "/api/v1/agent/join"
	timeout  = 60 * time.Second
	maxReply = 1 << 20
	// IP_BIND_ADDRESS_NO_PORT (linux/in.h): the port is chosen at connect, per destination.
	ipBindAddressNoPort = 24
)

var zones = [...]string{"ece-zone-1", "ece-zone-2", "ece-zone-3"}

type options struct {
	port, concurrency int
	joins, first      int64
	tokenFile, prefix string
}

// The generator's shared state: what every join reads, and the results.
type generator struct {
	opt         options
	token       string
	pin         []byte // the token's ca_fingerprint, decoded
	coordinator string // 127.0.0.1:PORT
	next        atomic.Int64

	mu       sync.Mutex
	latency  []float64
	failures map[string]int
}

func main() {
	opt := parseArgs()
	raw, err := os.ReadFile(opt.tokenFile)
	if err != nil {
		die("%v", err)
	}
	token := strings.TrimSpace(string(raw))
	pin, err := readPin(token)
	if err != nil {
		die("%v", err)
	}
	g := &generator{
		opt:         opt,
		token:       token,
		pin:         pin,
		coordinator: fmt.Sprintf("127.0.0.1:%d", opt.port),
		latency:     []float64{},
		failures:    map[string]int{},
	}
	before := cpuSeconds()
	started := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < opt.concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.joiner()
		}()
	}
	wg.Wait()
	seconds := time.Since(started).Seconds()
	cpu := cpuSeconds() - before
	out, err := json.Marshal(map[string]any{
		"generator":       "go " + runtime.Version() + " crypto/tls",
		"joined":          len(g.latency),
		"seconds":         seconds,
		"generator_cpu_s": cpu,
		"failures":        g.failures,
		"latency_s":       g.latency,
	})
	if err != nil {
		die("%v", err)
	}
	os.Stdout.Write(append(out, '\n'))
}

func (g *generator) joiner() {
	for {
		k := g.next.Add(1) - 1
		if k >= g.opt.joins {
			return
		}
		started := time.Now()
		err := g.join(g.opt.first + k)
		took := time.Since(started).Seconds()
		g.mu.Lock()
		if err != nil {
			g.failures[err.Error()]++
		} else {
			g.latency = append(g.latency, took)
		}
		g.mu.Unlock()
	}
}

// ------------------------------------------------------------------ one join

// hostIP is host n's own loopback address (as bench.agentjoin.local_ip and join.c number them).
func hostIP(n int64) net.IP {
	i := uint32(n)
	return net.IPv4(127, byte(i/8000+1), byte((i/250)%32), byte(i%250+1))
}

func (g *generator) join(n int64) error {
	rid := fmt.Sprintf("%s-%06d", g.opt.prefix, n)
	ip := hostIP(n)
	dialer := net.Dialer{
		LocalAddr: &net.TCPAddr{IP: ip},
		Timeout:   timeout,
		Control: func(_, _ string, c syscall.RawConn) error {
			var sockErr error
			err := c.Control(func(fd uintptr) {
				sockErr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
			})
			if err != nil {
				return err
			}
			return sockErr
		},
	}
	raw, err := dialer.Dial("tcp4", g.coordinator)
	if err != nil {
		return errors.New(reason(err))
	}
	// As the agent's socket closes: no close_notify.
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(timeout))
	// Verifies nothing yet: the pin and the check below do, before the token is sent.
	conn := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12})
	if err := conn.Handshake(); err != nil {
		return fmt.Errorf("tls: %s", reason(err))
	}
	reader := bufio.NewReader(conn)

	body, err := call(conn, reader, "ca", http.MethodGet, caPath, nil)
	if err != nil {
		return err
	}
	var caReply struct {
		CACertificate string `json:"ca_certificate"`
	}
	if json.Unmarshal(body, &caReply) != nil {
		return errors.New("ca: no certificate in the reply")
	}
	block, _ := pem.Decode([]byte(caReply.CACertificate))
	if block == nil {
		return errors.New("ca: no certificate in the reply")
	}
	ca, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return errors.New("ca: no certificate in the reply")
	}
	if fingerprint := sha256.Sum256(ca.RawSubjectPublicKeyInfo); !bytes.Equal(fingerprint[:], g.pin) {
		return errors.New("ca: pin mismatch") // the token is not sent
	}
	if !serverTrusted(conn.ConnectionState().PeerCertificates, ca, "127.0.0.1") {
		return errors.New("server certificate refused")
	}

	csr, err := newCSR(rid)
	if err != nil {
		return errors.New("csr")
	}
	request, err := json.Marshal(map[string]any{
		"token":           g.token,
		"csr":             csr,
		"runner_id":       rid,
		"host_ip":         ip.String(),
		"zone":            zones[n%3],
		"public_hostname": "",
		"capacity_mb":     65536,
		"tags":            map[string]string{},
		"report":          map[string]int{"memory_mb": 65536, "storage_mib": 512000, "cpus": 16},
		"roles":           []string{"allocator"},
	})
	if err != nil {
		return errors.New("join body")
	}
	body, err = call(conn, reader, "join", http.MethodPost, joinPath, request)
	if err != nil {
		return err
	}
	var joined struct {
		RunnerID    string `json:"runner_id"`
		Certificate string `json:"certificate"`
	}
	if json.Unmarshal(body, &joined) != nil || joined.RunnerID != rid ||
		!strings.Contains(joined.Certificate, "BEGIN CERTIFICATE") {
		return errors.New("join: unexpected reply")
	}
	return nil
}

// call sends one request on the connection and reads its reply (net/http's reader: framing by
// Content-Length or chunks, as the server chose): its body if it is a 200, else the error
// "<step>: http <status>".
func call(conn *tls.Conn, reader *bufio.Reader, step, method, path string, body []byte) ([]byte, error) {
	var content io.Reader
	if body != nil {
		content = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, "https://127.0.0.1"+path, content)
	if err != nil {
		return nil, err
	}
	req.Host = conn.RemoteAddr().String()
	req.Header.Set("Accept", "*/*")
	req.Header.Set("User-Agent", "muster-bench-join-go")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if err := req.Write(conn); err != nil {
		return nil, fmt.Errorf("tls: %s", reason(err))
	}
	resp, err := http.ReadResponse(reader, req)
	if err != nil {
		return nil, fmt.Errorf("reply: %s", reason(err))
	}
	defer resp.Body.Close()
	reply, err := io.ReadAll(io.LimitReader(resp.Body, maxReply+1))
	if err != nil {
		return nil, fmt.Errorf("reply: %s", reason(err))
	}
	if len(reply) > maxReply {
		return nil, errors.New("reply too large")
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: http %d", step, resp.StatusCode)
	}
	return reply, nil
}

// serverTrusted: the server's certificate is issued by ca, for ip, for a TLS server, valid now.
func serverTrusted(chain []*x509.Certificate, ca *x509.Certificate, ip string) bool {
	if len(chain) == 0 {
		return false
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	_, err := chain[0].Verify(x509.VerifyOptions{
		DNSName:   ip, // an IP address here is matched against the IP SANs
		Roots:     roots,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	return err == nil
}

// newCSR makes a new P-256 key and a PEM CSR for it (the agent keeps the key; nothing here
// needs it again).
func newCSR(rid string) (string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:            pkix.Name{CommonName: rid},
		SignatureAlgorithm: x509.ECDSAWithSHA256,
	}, key)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), nil
}

// reason is an error's short, countable form: the errno's name for a system call's failure.
func reason(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errnoName(errno)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "closed"
	}
	var netErr net.Error
	if errors.As(err, &netErr) && netErr.Timeout() {
		return "timeout"
	}
	return err.Error()
}

func errnoName(errno syscall.Errno) string {
	switch errno {
	case syscall.ECONNREFUSED:
		return "ECONNREFUSED"
	case syscall.ECONNRESET:
		return "ECONNRESET"
	case syscall.EADDRNOTAVAIL:
		return "EADDRNOTAVAIL"
	case syscall.EPIPE:
		return "EPIPE"
	case syscall.ETIMEDOUT:
		return "ETIMEDOUT"
	}
	return errno.Error()
}

// ------------------------------------------------------------------ the token's pin

// readPin is the token's ca_fingerprint claim ("sha256:" and colons optional), read from the
// JWT's payload without verifying it, as the agent reads it.
func readPin(token string) ([]byte, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, errors.New("the token file holds no roles token")
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return nil, errors.New("the token's payload is not base64url")
	}
	var claims struct {
		CAFingerprint string `json:"ca_fingerprint"`
	}
	if json.Unmarshal(payload, &claims) != nil || claims.CAFingerprint == "" {
		return nil, errors.New("the token has no ca_fingerprint")
	}
	text := claims.CAFingerprint
	if strings.HasPrefix(strings.ToLower(text), "sha256:") {
		text = text[len("sha256:"):]
	}
	pin, err := hex.DecodeString(strings.ReplaceAll(text, ":", ""))
	if err != nil || len(pin) != sha256.Size {
		return nil, errors.New("the token's ca_fingerprint is not a SHA-256")
	}
	return pin, nil
}

// ------------------------------------------------------------------ the process

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		die("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func parseArgs() options {
	opt := options{}
	flags := flag.NewFlagSet("join", flag.ContinueOnError)
	flags.SetOutput(os.Stderr)
	flags.IntVar(&opt.port, "port", 0, "the coordinator's API port")
	flags.StringVar(&opt.tokenFile, "token-file", "", "a file holding the roles token")
	flags.Int64Var(&opt.joins, "joins", 0, "hosts to join")
	flags.IntVar(&opt.concurrency, "concurrency", 64, "hosts joining at once")
	flags.StringVar(&opt.prefix, "prefix", "gj", "the runner ids' prefix")
	flags.Int64Var(&opt.first, "first-index", 0, "the first host's number")
	if err := flags.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		os.Exit(2)
	}
	switch {
	case opt.port <= 0 || opt.port > 65535:
		usageError("--port: a TCP port")
	case opt.tokenFile == "":
		usageError("--token-file is required")
	case opt.joins <= 0:
		usageError("--joins: a positive number")
	case opt.concurrency <= 0 || opt.concurrency > 4096:
		usageError("--concurrency: 1-4096")
	case opt.first < 0 || opt.first+opt.joins > 2032000:
		usageError("--first-index: too large")
	case len(opt.prefix) > 32:
		usageError("--prefix: at most 32 characters")
	}
	return opt
}

func usageError(message string) {
	fmt.Fprintf(os.Stderr, "join: %s\n", message)
	os.Exit(2)
}

func die(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "join: "+format+"\n", args...)
	os.Exit(1)
}

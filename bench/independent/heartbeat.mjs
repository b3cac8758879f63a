// An independent heartbeat load generator for a Muster coordinator, written from the wire
// protocol alone (docs/benchmarks.md): Node.js 20, standard library only, no code shared with
// bench/. N hosts, each with its own client certificate from a cached fleet, each on its own
// keep-alive HTTPS connection from its own 127.x.y.z address, send POST /api/v1/agent/heartbeat
// every --interval seconds at a random phase, open loop. Latency counts from each heartbeat's
// intended send time. Prints one JSON object: p50/p99/p99.9/max, failed, missed, and the CPU
// this generator used (process.cpuUsage of each of its processes) and, with --coordinator-pid,
// the coordinator's (its processes' utime + stime from /proc). The generator's own share of the
// latency is printed beside it: how late it sent each heartbeat (send lag) and how long its event
// loop stalled (perf_hooks' event-loop delay), and the seconds of the window in which heartbeats
// took over SLOW_MS (how many, and the latest the generator sent one of them), to tell a
// periodic stall from a spread tail, and the coordinator's stalls from the generator's own.
//
//   node bench/independent/heartbeat.mjs --fleet DIR --port PORT --hosts 25000 --interval 10 \
//     --seconds 120 [--ca FILE] [--processes 2] [--coordinator-pid PID]
//
// DIR holds hosts/00000.pem ... (certificate and key in one PEM each) and storage/coordinator/
// ca.crt, the platform CA. A slot that comes while the host's previous heartbeat is still
// waiting is missed (not sent); a heartbeat without a 200 within the interval has failed.
// Every host connects first (its first heartbeat, not measured) and keeps heartbeating from
// then on; the window starts one interval and SETTLE_S after the last host connected.

import { fork } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const PER_PROCESS = 16000; // connections per process: under the 20,000 open-files limit
const CONNECTING = 32; // first connections (TLS handshakes) in flight per process
const SETTLE_S = 5; // after every host is connected, before the measured window
const SLOW_MS = 50; // heartbeats slower than this are counted per second of the window

const { values: opt } = parseArgs({
  options: {
    fleet: { type: 'string' },
    ca: { type: 'string' },
    port: { type: 'string' },
    hosts: { type: 'string' },
    interval: { type: 'string', default: '10' },
    seconds: { type: 'string', default: '60' },
    processes: { type: 'string', default: '1' },
    version: { type: 'string', default: '0.0.0' },
    'coordinator-pid': { type: 'string' },
    child: { type: 'string' }, // internal: "first,count" of this child's hosts
  },
});

const now = () => performance.timeOrigin + performance.now(); // ms, comparable across processes
const interval = Number(opt.interval) * 1000;

function sourceAddress(i) {
  // One loopback address per host, as separate hosts have (the coordinator limits pending
  // TLS handshakes per address); 127.0.0.0/8 all answers on Linux.
  return `127.${Math.floor(i / 8000) + 1}.${Math.floor(i / 250) % 32}.${(i % 250) + 1}`;
}

async function child(first, count) {
  const ca = fs.readFileSync(opt.ca ?? path.join(opt.fleet, 'storage/coordinator/ca.crt'));
  const body = JSON.stringify({
    memory_mb: 65536, storage_mib: 512000, cpus: 16, healthy: true,
    checks: { storage_writable: true, docker: true }, version: opt.version, instances: [],
  });
  const hosts = [];
  for (let i = first; i < first + count; i++) {
    const pem = fs.readFileSync(path.join(opt.fleet, 'hosts', `${String(i).padStart(5, '0')}.pem`));
    const agent = new https.Agent({ keepAlive: true, maxSockets: 1, cert: pem, key: pem, ca });
    hosts.push({ i, agent, busy: false });
  }
  const beat = (host) => new Promise((resolve) => {
    const req = https.request({
      host: '127.0.0.1', port: Number(opt.port), method: 'POST', path: '/api/v1/agent/heartbeat',
      agent: host.agent, localAddress: sourceAddress(host.i), timeout: interval,
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    }, (res) => { res.resume(); res.on('end', () => resolve(res.statusCode)); });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', (err) => resolve(err.code ?? err.message));
    req.end(body);
  });

  // The measured window, once the parent names it; until then nothing counts.
  let from = Infinity, to = Infinity;
  const latencies = [], lags = [], slow = {}, failures = {};
  let missed = 0, cpuFrom = null, cpuTo = null;
  const schedule = (host) => {
    // From its connection on, each host heartbeats every interval at a random phase, so its
    // kept connection is never idle for longer than one interval.
    let due = now() + Math.random() * interval;
    const tick = async () => {
      if (due >= to) return;
      const intended = due;
      due += interval;
      setTimeout(tick, due - now());
      if (host.busy) { if (intended >= from && intended < to) missed++; return; }
      host.busy = true;
      const lag = now() - intended;
      const status = await beat(host);
      host.busy = false;
      if (intended < from || intended >= to) return;
      lags.push(lag);
      if (status !== 200) { failures[status] = (failures[status] ?? 0) + 1; return; }
      const latency = now() - intended;
      latencies.push(latency);
      if (latency > SLOW_MS) {
        // [heartbeats over SLOW_MS, the latest this generator sent one of them] per second
        const second = Math.floor((intended - from) / 1000);
        const [n, late] = slow[second] ?? [0, 0];
        slow[second] = [n + 1, Math.max(late, lag)];
      }
    };
    setTimeout(tick, due - now());
  };

  // Connect every host (its first heartbeat, not measured), CONNECTING at a time.
  let next = 0, connectFailed = 0;
  await Promise.all(Array.from({ length: CONNECTING }, async () => {
    while (next < hosts.length) {
      const host = hosts[next++];
      if ((await beat(host)) !== 200) connectFailed++;
      schedule(host);
    }
  }));
  process.send({ connected: hosts.length, connectFailed });
  ({ from, to } = await new Promise((resolve) => process.once('message', resolve)));
  const loopDelay = monitorEventLoopDelay({ resolution: 10 });
  setTimeout(() => { cpuFrom = process.cpuUsage(); loopDelay.enable(); }, from - now());
  setTimeout(() => { cpuTo = process.cpuUsage(cpuFrom); loopDelay.disable(); }, to - now());
  await new Promise((resolve) => setTimeout(resolve, to - now() + interval + 1000));
  for (const host of hosts) host.agent.destroy();
  process.send({
    latencies, lags, slow, failures, missed, cpuUs: cpuTo.user + cpuTo.system,
    loopDelayMs: { p99: loopDelay.percentile(99) / 1e6, max: loopDelay.max / 1e6 },
  });
}

function coordinatorCpuS(pid) {
  // utime + stime of the process and every process under it, in seconds (USER_HZ = 100).
  let total = 0;
  const todo = [pid];
  while (todo.length) {
    const p = todo.shift();
    try {
      const stat = fs.readFileSync(`/proc/${p}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      total += (Number(fields[11]) + Number(fields[12])) / 100;
      for (const task of fs.readdirSync(`/proc/${p}/task`)) {
        const kids = fs.readFileSync(`/proc/${p}/task/${task}/children`, 'utf8').trim();
        if (kids) todo.push(...kids.split(' ').map(Number));
      }
    } catch { /* a process that ended */ }
  }
  return total;
}

function percentile(sorted, p) {
  if (!sorted.length) return 0;
  return sorted[Math.max(0, Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1))];
}

async function parent() {
  const hosts = Number(opt.hosts);
  const processes = Math.max(Number(opt.processes), Math.ceil(hosts / PER_PROCESS));
  const args = process.argv.slice(2);
  const children = [];
  for (let n = 0; n < processes; n++) {
    const first = Math.floor((n * hosts) / processes);
    const count = Math.floor(((n + 1) * hosts) / processes) - first;
    children.push(fork(fileURLToPath(import.meta.url), [...args, '--child', `${first},${count}`]));
  }
  const message = (c) => new Promise((resolve) => c.once('message', resolve));
  const connected = await Promise.all(children.map(message));
  const from = now() + interval + SETTLE_S * 1000; // every host on its schedule by then
  const to = from + Number(opt.seconds) * 1000;
  const results = children.map(message);
  for (const c of children) c.send({ from, to });
  const pid = opt['coordinator-pid'] ? Number(opt['coordinator-pid']) : null;
  let coordinator = null;
  if (pid) {
    let before = 0;
    setTimeout(() => { before = coordinatorCpuS(pid); }, from - now());
    setTimeout(() => { coordinator = coordinatorCpuS(pid) - before; }, to - now());
  }
  const answers = await Promise.all(results);
  const latencies = Float64Array.from(answers.flatMap((a) => a.latencies)).sort();
  const failures = {};
  for (const a of answers) for (const [k, v] of Object.entries(a.failures)) failures[k] = (failures[k] ?? 0) + v;
  const count = latencies.length;
  const round = (x) => Math.round(x * 100) / 100;
  const ms = (p) => round(percentile(latencies, p));
  const lags = Float64Array.from(answers.flatMap((a) => a.lags)).sort();
  const slow = {};
  for (const a of answers) {
    for (const [k, [n, late]] of Object.entries(a.slow)) {
      const [total, latest] = slow[k] ?? [0, 0];
      slow[k] = [total + n, round(Math.max(latest, late))];
    }
  }
  const generatorS = answers.reduce((sum, a) => sum + a.cpuUs, 0) / 1e6;
  const out = {
    generator: 'node ' + process.version,
    hosts, processes, interval_s: interval / 1000, window_s: Number(opt.seconds),
    window_from_unix_s: round(from / 1000),
    connected: connected.reduce((s, c) => s + c.connected, 0),
    connect_failed: connected.reduce((s, c) => s + c.connectFailed, 0),
    heartbeats: count, rate: Math.round(count / Number(opt.seconds)),
    p50_ms: ms(50), p99_ms: ms(99), p999_ms: ms(99.9), max_ms: ms(100),
    failed: Object.values(failures).reduce((s, v) => s + v, 0), failures,
    missed: answers.reduce((s, a) => s + a.missed, 0),
    generator_cpu_s: Math.round(generatorS * 10000) / 10000,
    generator_cpu_us_per_heartbeat: Math.round((generatorS / Math.max(1, count)) * 1e6),
    generator_send_lag_ms: { p99: round(percentile(lags, 99)), max: round(percentile(lags, 100)) },
    generator_loop_delay_ms: {
      p99: round(Math.max(...answers.map((a) => a.loopDelayMs.p99))),
      max: round(Math.max(...answers.map((a) => a.loopDelayMs.max))),
    },
    [`seconds_with_heartbeats_over_${SLOW_MS}_ms`]: slow,
  };
  if (coordinator !== null) {
    out.coordinator_cpu_s = Math.round(coordinator * 100) / 100;
    out.coordinator_cpu_us_per_heartbeat = Math.round((coordinator / Math.max(1, count)) * 1e6);
  }
  console.log(JSON.stringify(out));
}

if (opt.child) {
  const [first, count] = opt.child.split(',').map(Number);
  child(first, count);
} else {
  parent();
}

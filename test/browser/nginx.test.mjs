// lua-sse behind nginx over HTTP/2 (examples/nginx/nginx.conf.in), against lua-sse alone.
// Browsers open at most 6 HTTP/1.1 connections per host, so from one page a 7th
// EventSource to lua-sse itself waits until one of the first 6 closes; through nginx
// (TLS + HTTP/2 to the browser, HTTP/1.1 to lua-sse) all of them share one connection.
// nginx runs from the template with its ports filled in, as a foreground process (no
// daemon) in a temporary directory, with a self-signed certificate made by openssl; it is
// stopped by its PID. Needs nginx with http_v2 (Debian: nginx-light; SSE_SETUP_TEST=1 bash
// scripts/setup.sh installs it) and openssl.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { connect as tcpConnect, createServer } from 'node:net';
import { connect as h2connect } from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT, startLua, launchBrowser, cleanup, waitFor, withTimeout, stopper } from './lib.mjs';

const TEMPLATE = process.env.NGINX_CONF_TEMPLATE || join(ROOT, 'examples/nginx/nginx.conf.in');
const NGINX = process.env.NGINX || 'nginx';

let nginx;         // { url, port, dir, proc, output(), stop() }
let srv;           // the lua-sse fixture
let browser;
let page;

after(async () => {
  if (nginx) await nginx.stop().catch(() => {});
  await cleanup();
  if (nginx && !process.env.KEEP_NGINX_DIR) rmSync(nginx.dir, { recursive: true, force: true });
});
// Last resort if this file dies without after(): nginx does not outlive it.
process.once('exit', () => {
  if (nginx && !nginx.exited()) {
    try { nginx.proc.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

// A port nothing listens on right now (nginx needs a number in its config).
function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => res(port)); });
  });
}

const canConnect = (port) => new Promise((res) => {
  const sock = tcpConnect({ host: '127.0.0.1', port }, () => { sock.destroy(); res(true); });
  sock.once('error', () => res(false));
  sock.setTimeout(1_000, () => { sock.destroy(); res(false); });
});

// nginx in front of 127.0.0.1:upstreamPort, from the template, on a free port.
async function startNginx(upstreamPort) {
  const dir = mkdtempSync(join(tmpdir(), 'lua-sse-nginx-test-'));
  mkdirSync(join(dir, 'tmp'));
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
    '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')], { stdio: 'ignore', timeout: 30_000 });
  let lastError;
  for (let attempt = 0; attempt < 3; attempt++) {   // another process may take the port first
    const port = await freePort();
    const conf = readFileSync(TEMPLATE, 'utf8')
      .replaceAll('@LISTEN@', `127.0.0.1:${port}`)
      .replaceAll('@UPSTREAM@', `127.0.0.1:${upstreamPort}`)
      .replaceAll('@DIR@', dir);
    assert.ok(!/@[A-Z]+@/.test(conf), 'a placeholder left in the config');
    writeFileSync(join(dir, 'nginx.conf'), conf);
    const proc = spawn(NGINX, ['-p', dir, '-c', join(dir, 'nginx.conf'),
      '-g', `daemon off; pid ${join(dir, 'nginx.pid')};`], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let exited = null;
    const exit = new Promise((res) => proc.once('exit', (code, signal) => { exited = { code, signal }; res(exited); }));
    proc.once('error', (e) => { out += `spawn: ${e.message}\n`; });
    proc.stdout.setEncoding('utf8').on('data', (s) => { out += s; });
    proc.stderr.setEncoding('utf8').on('data', (s) => { out += s; });
    const server = {
      url: `https://127.0.0.1:${port}`, port, dir, proc,
      output: () => out,
      exited: () => exited,
      // SIGTERM (nginx's fast shutdown: it closes open streams) to this PID, SIGKILL after ms.
      stop: stopper(proc, exit, 'nginx'),
    };
    try {
      await waitFor(async () => {
        if (exited) throw new Error(`nginx exited (${JSON.stringify(exited)})`);
        return canConnect(port);
      }, 10_000, 'nginx listening', 50);
      return server;
    } catch (e) {
      await server.stop(1_000);
      lastError = new Error(`${e.message}\nnginx output:\n${out}`);
      if (!/in use/.test(out)) break;
    }
  }
  throw lastError;
}

// The fixture's own figures, straight from lua-sse (not through the page's connections).
async function stats() {
  const res = await fetch(`${srv.url}/stats`, { signal: AbortSignal.timeout(5_000) });
  assert.equal(res.status, 200);
  return res.json();
}

const received = () => page.evaluate(() => window.streams.map((s) => s.events.length));
const fail = async (e) => {
  const got = await received().catch(() => '?');
  throw new Error(`${e.message}\nevents per stream: ${JSON.stringify(got)}\npage errors: ${page.errors.join('; ')}\n` +
    `server output:\n${srv.output()}\nnginx output:\n${nginx.output()}`);
};

before(async () => {
  try {
    execFileSync(NGINX, ['-v'], { stdio: 'ignore', timeout: 5_000 });
  } catch {
    throw new Error(`no ${NGINX}: run SSE_SETUP_TEST=1 bash scripts/setup.sh (installs nginx-light)`);
  }
  srv = await startLua('test/browser/fixtures/nginx_app.lua');
  nginx = await startNginx(srv.port);
  browser = await launchBrowser();
  // The certificate is self-signed: this context accepts it (and only this one).
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  context.setDefaultTimeout(10_000);
  context.setDefaultNavigationTimeout(10_000);
  page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') page.errors.push(`console: ${m.text()}`); });
});

test('nginx answers over HTTP/2 (ALPN h2) with the stream headers and no buffering', { timeout: 30_000 }, async () => {
  const client = h2connect(nginx.url, { rejectUnauthorized: false });
  let req;
  try {
    await withTimeout(new Promise((res, rej) => { client.once('connect', res); client.once('error', rej); }),
      5_000, 'HTTP/2 connect');
    assert.equal(client.alpnProtocol, 'h2');
    req = client.request({ ':path': '/stream?i=99', 'accept-encoding': 'gzip' });
    const headers = await withTimeout(new Promise((res) => req.once('response', res)), 5_000, 'response headers');
    assert.equal(headers[':status'], 200);
    assert.equal(headers['content-type'], 'text/event-stream');
    assert.equal(headers['cache-control'], 'no-cache');
    assert.equal(headers['content-encoding'], undefined, 'nginx must not compress the stream');
    assert.equal(headers['x-accel-buffering'], undefined, 'nginx keeps X-Accel-Buffering to itself');
    // Three events 0.2 s apart arrive one by one: nothing holds them back.
    const arrivals = [];
    let text = '';
    req.setEncoding('utf8');
    req.on('data', (s) => {
      text += s;
      for (const m of s.matchAll(/^data: /gm)) arrivals.push({ at: Date.now(), m });
    });
    await waitFor(() => arrivals.length >= 3, 5_000, 'three events over HTTP/2');
    assert.ok(arrivals[2].at - arrivals[0].at >= 250,
      `events arrived together (buffered?): ${arrivals.map((a) => a.at - arrivals[0].at)} ms\n${text}`);
    const first = /^data: (.*)$/m.exec(text);
    assert.deepEqual(JSON.parse(first[1]), { i: 99, n: 1 });
  } finally {
    if (req) req.close();     // RST_STREAM: nginx closes the upstream stream
    client.destroy();
  }
  await waitFor(async () => (await stats()).open === 0, 10_000, 'the HTTP/2 stream closed at lua-sse');
});

test('through nginx (HTTP/2): one page opens 10 EventSources and all 10 receive events', { timeout: 60_000 }, async () => {
  await page.goto(`${nginx.url}/`);
  const nav = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  assert.equal(nav, 'h2', 'the page did not come over HTTP/2');
  const before = await stats();

  await page.evaluate(() => window.openStreams(10, '/stream'));
  await waitFor(async () => (await received()).every((n) => n >= 2), 15_000, 'two events on each of 10 streams')
    .catch(fail);

  const s = await stats();
  assert.equal(s.open, 10, 'lua-sse should have 10 streams open (one upstream connection each)');
  assert.equal(s.started - before.started, 10);
  const upstream = s.requests.filter((r) => r.path === '/stream' && r.i !== '99');
  assert.equal(upstream.length, 10);
  for (const r of upstream) {
    assert.equal(r.connection, false, 'nginx sent a Connection header upstream (proxy_set_header Connection "")');
    assert.equal(r.forwarded_proto, 'https');
  }
  // An ordinary request from the page goes over HTTP/2 as well, not queued behind the streams.
  const proto = await page.evaluate(async () => {
    const res = await fetch('/stats');
    await res.json();
    const e = performance.getEntriesByType('resource').find((x) => x.name.endsWith('/stats'));
    return e && e.nextHopProtocol;
  });
  assert.equal(proto, 'h2');
  assert.deepEqual(page.errors, [], 'errors in the page');
});

test('through nginx: Last-Event-ID reaches lua-sse when EventSource reconnects', { timeout: 30_000 }, async () => {
  await page.evaluate(() => window.openResume());
  const resumed = await waitFor(() => page.evaluate(() => window.resumed), 10_000, 'the resumed event')
    .catch(fail);
  assert.deepEqual(resumed, { last_event_id: 'resume-7' });
  const r = (await stats()).requests.filter((x) => x.path === '/resume');
  assert.deepEqual(r.map((x) => x.last_event_id), [false, 'resume-7']);
});

test('nginx logs the page\'s streams as HTTP/2.0 and closes them upstream when the page leaves', { timeout: 30_000 }, async () => {
  await page.goto('about:blank');
  await waitFor(async () => (await stats()).open === 0, 10_000, 'lua-sse streams closed after the page left');
  const log = join(nginx.dir, 'access.log');
  const lines = await waitFor(() => {
    const l = existsSync(log) ? readFileSync(log, 'utf8').split('\n').filter((x) => /"GET \/stream\?i=\d /.test(x)) : [];
    return l.length >= 10 && l;
  }, 10_000, 'ten /stream lines in the access log');
  for (const l of lines) assert.match(l, / HTTP\/2\.0 "GET \/stream\?i=\d HTTP\/2\.0" 200 /, l);
});

test('straight to lua-sse (HTTP/1.1): only 6 EventSources at once; a 7th starts when one closes', { timeout: 60_000 }, async () => {
  await page.goto(`${srv.url}/`);
  const nav = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  assert.equal(nav, 'http/1.1');
  const base = await stats();
  assert.equal(base.open, 0);

  await page.evaluate(() => window.openStreams(10, '/stream'));
  // The window: until each of the first 6 has had 10 events (2 s of them), the others
  // must have had none.
  const counts = await waitFor(async () => {
    const c = await received();
    return c.filter((n) => n >= 10).length >= 6 && c;
  }, 20_000, 'ten events on each of 6 streams').catch(fail);
  const live = counts.flatMap((n, i) => (n > 0 ? [i] : []));
  assert.deepEqual(live, [0, 1, 2, 3, 4, 5], `streams with events: ${JSON.stringify(counts)}`);
  let s = await stats();
  assert.equal(s.open, 6, 'lua-sse should see exactly 6 streams');
  assert.equal(s.started - base.started, 6);

  // Two of the 6 close: two of the waiting ones get their connection and their events.
  await page.evaluate(() => { window.closeStream(0); window.closeStream(1); });
  const after2 = await waitFor(async () => {
    const c = await received();
    return c.slice(6).filter((n) => n >= 2).length >= 2 && c;
  }, 15_000, 'two waiting streams proceed after two closed').catch(fail);
  const now = after2.slice(6).flatMap((n, i) => (n > 0 ? [i + 6] : []));
  assert.equal(now.length, 2, `exactly two of the waiting streams should proceed: ${JSON.stringify(after2)}`);
  s = await stats();
  assert.equal(s.open, 6);
  assert.equal(s.started - base.started, 8);

  await page.goto('about:blank');
  await waitFor(async () => (await stats()).open === 0, 10_000, 'lua-sse streams closed after the page left');
  assert.deepEqual(page.errors, [], 'errors in the page');
});

test('nginx and lua-sse stop cleanly', { timeout: 30_000 }, async () => {
  await browser.close();
  const n = await nginx.stop();
  assert.equal(n.killed, false, `nginx needed SIGKILL\n${nginx.output()}`);
  const l = await srv.stop();
  assert.equal(l.killed, false, 'lua-sse needed SIGKILL');
  assert.doesNotMatch(nginx.output(), /\[(emerg|alert|crit)\]/, nginx.output());
});

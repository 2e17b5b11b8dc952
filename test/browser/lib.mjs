// Helpers shared by the browser and Node tests (node --test test/browser/).
//
//   import { startLua, launchBrowser, newPage, cleanup, readSSE } from './lib.mjs';
//   after(cleanup);                                   // stops every server and browser
//   const srv = await startLua('test/browser/fixtures/exact.lua', { FOO: '1' });
//   const browser = await launchBrowser();
//   const page = await newPage(browser);             // page.errors collects page errors
//   await page.goto(srv.url + '/', { timeout: 10_000 });
//
// Everything here is bounded: a server that prints no URL, a browser that does not start,
// a process that ignores SIGTERM all end in an error (or SIGKILL) after a timeout, never a
// hang. Servers run this checkout's Lua modules (lua/) and C module (build/lib/) first,
// then whatever is installed system-wide.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const HERE = dirname(fileURLToPath(import.meta.url));
export const ROOT = resolve(HERE, '..', '..');
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-quic', '--no-first-run',
];

const servers = new Set();
const browsers = new Set();

// Rejects with a message naming `what` if `promise` does not settle within `ms`.
export function withTimeout(promise, ms, what) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls fn() (sync or async) until it returns a truthy value, which is returned; throws
// after ms with `what` (and the last error fn threw, if any).
export async function waitFor(fn, ms, what, every = 20) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) {
      throw new Error(`${what}: not true after ${ms} ms${last ? ` (last error: ${last.message})` : ''}`);
    }
    await sleep(every);
  }
}

// The stop(ms) of a child process: SIGTERM, then SIGKILL if it has not ended after ms.
// exit: a promise of its { code, signal }. Resolves { code, signal, killed }.
export function stopper(proc, exit, what) {
  let ended = null;
  exit.then((r) => { ended = r; });
  return async function stop(ms = 5_000) {
    if (ended) return { ...ended, killed: false };
    proc.kill('SIGTERM');
    let timer;
    const late = new Promise((res) => { timer = setTimeout(() => res('late'), ms); });
    const r = await Promise.race([exit, late]);
    clearTimeout(timer);
    if (r !== 'late') return { ...r, killed: false };
    proc.kill('SIGKILL');
    return { ...(await withTimeout(exit, 2_000, `${what}: SIGKILL`)), killed: true };
  };
}

// Starts `lua5.4 <script>` (path relative to the checkout, or absolute) with PORT=0 and
// `env`, line-buffered through stdbuf, and resolves once it printed its first
// http://127.0.0.1:NNNN URL. Returns { url, port, proc, output(), stop() }.
// output() is everything it printed so far (stdout and stderr), for failure messages.
export async function startLua(scriptPath, env = {}, { timeout = 10_000 } = {}) {
  const script = isAbsolute(scriptPath) ? scriptPath : join(ROOT, scriptPath);
  if (!existsSync(script)) throw new Error(`startLua: no such script ${script}`);
  const luaPath = `${ROOT}/lua/?.lua;${ROOT}/lua/?/init.lua;;`;
  const luaCpath = `${ROOT}/build/lib/?.so;;`;
  const proc = spawn('stdbuf', ['-oL', '-eL', 'lua5.4', script], {
    cwd: ROOT,
    env: { ...process.env, PORT: '0', LUA_PATH: luaPath, LUA_CPATH: luaCpath, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let exited = null;
  const exit = new Promise((res) => proc.once('exit', (code, signal) => {
    exited = { code, signal };
    servers.delete(server);
    res(exited);
  }));
  proc.stderr.setEncoding('utf8');
  proc.stderr.on('data', (s) => { out += s; });
  proc.stdout.setEncoding('utf8');

  const server = {
    proc,
    output: () => out,
    exited: () => exited,
    // SIGTERM, then wait at most `ms` for the process to end (SIGKILL after that).
    // Resolves { code, signal, killed }.
    stop: stopper(proc, exit, `startLua(${scriptPath})`),
  };
  servers.add(server);

  const url = new Promise((res, rej) => {
    let buf = '';
    proc.stdout.on('data', (s) => {
      out += s;
      buf += s;
      const m = /http:\/\/127\.0\.0\.1:(\d+)/.exec(buf);
      if (m) { res(m[0]); buf = ''; }
    });
    proc.once('error', (e) => rej(new Error(`startLua(${scriptPath}): ${e.message}`)));
    exit.then((r) => rej(new Error(
      `startLua(${scriptPath}): exited (code ${r.code}, signal ${r.signal}) before printing a URL:\n${out}`)));
  });
  try {
    server.url = await withTimeout(url, timeout, `startLua(${scriptPath}): waiting for its URL`);
  } catch (e) {
    await server.stop(1_000);
    e.message += `\noutput so far:\n${out}`;
    throw e;
  }
  server.port = Number(new URL(server.url).port);
  return server;
}

// Headless Chromium (the Debian package) through playwright-core. Playwright gives every
// launch a fresh temporary --user-data-dir and removes it on close.
export async function launchBrowser({ timeout = 30_000 } = {}) {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`launchBrowser: no Chromium at ${CHROMIUM}: run bash scripts/setup-browser.sh`);
  }
  const { chromium } = await import('playwright-core');
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout,
    handleSIGINT: false,
    handleSIGTERM: false,
  });
  browsers.add(browser);
  browser.once('disconnected', () => browsers.delete(browser));
  return browser;
}

// A page in a fresh context, with bounded default timeouts. page.errors collects uncaught
// page errors and console errors, page.logs every console line (for failure messages).
export async function newPage(browser, { timeout = 10_000, viewport } = {}) {
  const context = await browser.newContext(viewport ? { viewport } : {});
  context.setDefaultTimeout(timeout);
  context.setDefaultNavigationTimeout(timeout);
  const page = await context.newPage();
  page.errors = [];
  page.logs = [];
  page.on('pageerror', (e) => page.errors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    page.logs.push(`${m.type()}: ${m.text()}`);
    if (m.type() === 'error') page.errors.push(`console: ${m.text()}`);
  });
  return page;
}

// Closes every browser and stops every server started by this process (bounded).
export async function cleanup() {
  const jobs = [];
  for (const b of browsers) jobs.push(withTimeout(b.close(), 10_000, 'browser.close').catch(() => {}));
  for (const s of servers) jobs.push(s.stop().catch(() => {}));
  await Promise.all(jobs);
}

// Last resort if a test file dies without cleanup: no server outlives this process.
process.once('exit', () => {
  for (const s of servers) {
    try { s.proc.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

// Reads an SSE response body (a fetch() Response) with the WHATWG parsing rules and
// returns { events, comments, ended }: events are { type, data, id, at } in order (`at`:
// ms since the read started when the event's blank line arrived), ended is true when the
// body ended cleanly. Stops reading after `timeout` ms (then throws), or once
// stopWhen(event) returns true (then ended is false and the body is cancelled).
export async function readSSE(response, { timeout = 15_000, stopWhen } = {}) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder('utf-8');
  const t0 = Date.now();
  const events = [];
  const comments = [];
  let buf = '';
  let data = [];
  let type = '';
  let lastId = '';
  let first = true;
  let stopped = false;

  const line = (l) => {
    if (l === '') {
      if (data.length) {
        const ev = { type: type || 'message', data: data.join('\n'), id: lastId, at: Date.now() - t0 };
        events.push(ev);
        if (stopWhen && stopWhen(ev)) stopped = true;
      }
      data = []; type = '';
      return;
    }
    if (l[0] === ':') { comments.push(l.slice(1)); return; }
    const i = l.indexOf(':');
    const name = i < 0 ? l : l.slice(0, i);
    let value = i < 0 ? '' : l.slice(i + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (name === 'data') data.push(value);
    else if (name === 'event') type = value;
    else if (name === 'id' && !value.includes('\0')) lastId = value;
  };
  const feed = (text) => {
    if (first && text) {
      if (text[0] === '\uFEFF') text = text.slice(1);
      first = false;
    }
    buf += text;
    // A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
    for (;;) {
      const m = /\r\n|\r|\n/.exec(buf);
      if (!m || (m[0] === '\r' && m.index === buf.length - 1)) break;
      line(buf.slice(0, m.index));
      buf = buf.slice(m.index + m[0].length);
      if (stopped) return;
    }
  };

  const read = (async () => {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        feed(decoder.decode());
        if (buf.endsWith('\r')) { line(buf.slice(0, -1)); buf = ''; }
        return true;
      }
      feed(decoder.decode(value, { stream: true }));
      if (stopped) { await reader.cancel().catch(() => {}); return false; }
    }
  })();
  try {
    const ended = await withTimeout(read, timeout, 'readSSE');
    return { events, comments, ended, rest: buf };
  } catch (e) {
    await reader.cancel().catch(() => {});
    e.message += ` (${events.length} events so far: ${JSON.stringify(events.slice(-3))})`;
    throw e;
  }
}

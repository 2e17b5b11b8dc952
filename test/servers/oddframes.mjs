// A Node `http` server that sends Server-Sent Events in odd framings, for comparing SSE
// clients (app:eventsource, the npm `eventsource` package, Chromium's EventSource) and
// for counting their reconnects.
//
//   node test/servers/oddframes.mjs [port]     # port 0 (the default): a free port
//   -> prints http://127.0.0.1:PORT on its first line, then serves until killed
//   import { start, ROUTES } from '../servers/oddframes.mjs'   // in-process: await start(0)
//
// Routes (GET; every response has Access-Control-Allow-Origin: *):
//   /                 a blank HTML page (an origin for a browser to open EventSource from)
//   /odd/<name>       one script of ROUTES below: bytes written exactly as given (Latin-1
//                     strings are bytes), each write its own chunk, with small pauses where
//                     the split matters; then the response ends (or the socket is destroyed)
//   /longline?bytes=N "data: " and N bytes of 'x' with no line end, in 64 KiB writes as fast
//                     as the client reads, then the connection stays open
//   /flaky?retry=MS&max=K&key=S   "retry: MS", an event with id n (the request's number for
//                     this key), then the end; from request K+1 on: 204
//   /seq/<name>?key=S one of SEQUENCES below: request n (counted per name and key) gets body
//                     n of the list, then the end; past the list, 204
//   /count?route=R[&key=S]        {"count": requests so far, "requests": [{at, lastEventId}]}
//                     R is "odd/<name>", "seq/<name>", "longline" or "flaky"
// Nothing here is an assertion: the tests decide what the clients should have seen.
import http from 'node:http';
import { pathToFileURL } from 'node:url';

const SSE = { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' };
const pause = (ms) => ({ pause: ms });
const BOM = '\xEF\xBB\xBF';

// name -> { head: extra response head, steps: [bytes | pause(ms)], end: 'end' | 'destroy',
//           names: event types it uses besides "message" }
// A pause separates two writes by that many ms, so the client almost surely reads them
// as two pieces (Nagle is off); the clients must give the same events either way.
export const ROUTES = {
  lf: { steps: ['data: a\n\nid: 1\ndata: b\n\n'] },
  crlf: { steps: ['data: a\r\n\r\nid: 1\r\ndata: b\r\ndata: c\r\n\r\n'] },
  cr: { steps: ['data: a\r\rid: 1\rdata: b\rdata: c\r\r: more\r'] },
  // the stream's very last byte is the CR of a blank line: still a line end
  cr_at_end: { steps: ['data: a\r\rdata: b\r\r'] },
  mixed: {
    steps: ['data: a\r\ndata: b\rdata: c\n\r\nevent: x\rdata: d\r\n\n',
      // a CRLF split across writes is one line end; then LF CR is two
      'data: e\r', pause(30), '\ndata: f\r', pause(30), '\n\r', pause(30), '\n',
      'data: g\n', pause(30), '\rdata: h\n\n'],
    names: ['x'],
  },
  bom: { steps: [BOM + 'data: a\n\n' + BOM + 'data: b\n\ndata: c\n\n'] },
  bom_split: { steps: ['\xEF', pause(30), '\xBB', pause(30), '\xBFdata: a\n\n'] },
  bom_twice: { steps: [BOM + BOM + 'data: a\n\ndata: b\n\n'] },
  one_byte_writes: {
    steps: [...': c\r\nevent: ping\rid: 7\ndata: h\xC3\xA9\r\ndata: \xF0\x9F\x98\x80\n\r\n'
      + 'retry: 300\ndata: z\r\rid\ndata: y\n\n'].flatMap((b) => [b, pause(3)]),
    names: ['ping'],
  },
  utf8_split: {
    // é (C3 A9), ✓ (E2 9C 93), 😀 (F0 9F 98 80): each cut inside
    steps: ['data: caf\xC3', pause(30), '\xA9 \xE2', pause(30), '\x9C', pause(30),
      '\x93 \xF0\x9F', pause(30), '\x98\x80\n\n', 'event: \xE2\x9C', pause(30), '\x93\ndata: x\n\n'],
    names: ['\u2713'],
  },
  comments: { steps: [': hello\n:\ndata: a\n: in the middle\ndata: b\n\n:only a comment\n\n', ':no end'] },
  retry: {
    steps: ['retry: 300\ndata: a\n\nretry: 12a\ndata: b\n\nretry:  5\nretry: -1\nretry: 1.5\nretry\n'
      + 'data: c\n\n'],
  },
  id_nul: {
    steps: ['id: 1\ndata: a\n\nid: 2\0x\ndata: b\n\nid: 3\ndata: c\n\nid\ndata: d\n\n'
      + 'id:  5 \ndata: e\n\nid: 6\n\ndata: f\n\n'],
  },
  unterminated: { steps: ['data: a\n\ndata: b\n'] },
  unterminated_no_eol: { steps: ['id: 1\ndata: a\n\nid: 2\ndata: b'] },
  drop_mid_event: { steps: ['data: a\n\ndata: b\nda'], end: 'destroy' },
  drop_mid_line: { steps: ['id: 9\ndata: a\n\n', pause(30), 'data: b\r\n\r\ndata: c'], end: 'destroy' },
  names: {
    steps: ['event: ping\ndata: 1\n\nevent: update\ndata: 2\n\ndata: 3\n\nevent:\ndata: 4\n\n'
      + 'event: ping\n\ndata: 5\n\nevent: two words\ndata: 6\n\nevent: ping\nevent: update\ndata: 7\n\n'],
    names: ['ping', 'update', 'two words'],
  },
  multiline: {
    steps: ['data: line1\ndata: line2\ndata:\ndata:  two spaces\ndata:\ttab\n\n'
      + 'data: a\ndata: \n\ndata:no space\ndata: x:y: z\n\n'],
  },
  empty: { steps: ['data\n\ndata:\n\ndata: \n\ndata\ndata\n\nevent: e\n\n\n\n\ndata: end\n\n'] },
  fields: { steps: ['Data: a\ndata : b\nfoo: c\ndata\n\ndata: d\n\n'] },
  status204: { head: { status: 204 }, steps: [] },
  status500: { head: { status: 500 }, steps: ['data: a\n\n'] },
  wrong_type: { head: { headers: { 'Content-Type': 'text/plain' } }, steps: ['data: a\n\n'] },
  no_type: { head: { headers: { 'Content-Type': null } }, steps: ['data: a\n\n'] },
};

// name -> the bodies of requests 1, 2, ...: what a reconnecting client keeps across
// connections (the last event id, the retry).
export const SEQUENCES = {
  ids: [
    'retry: 50\nid: 1\ndata: a\n\n',
    'data: b\n\nid: 2\n\n',          // b: the id kept from before; then an id alone
    'data: c\n\nid\ndata: d\n\n',     // c: 2; "id" with no value resets it
    'data: e\n\n',
  ],
  retry: ['retry: 200\ndata: a\n\n', 'data: b\n\n', 'retry: 50\ndata: c\n\n', 'data: d\n\n'],
};

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function start(port = 0, host = '127.0.0.1') {
  const counts = new Map();   // route key -> [{ at, lastEventId }]
  const sockets = new Set();
  const count = (key, req) => {
    if (!counts.has(key)) counts.set(key, []);
    const list = counts.get(key);
    list.push({ at: Date.now(), lastEventId: req.headers['last-event-id'] ?? null });
    return list.length;
  };

  const server = http.createServer(async (req, res) => {
    req.socket.setNoDelay(true);
    const url = new URL(req.url, 'http://x');
    const path = url.pathname;
    res.setHeader('Access-Control-Allow-Origin', '*');
    let closed = false;
    res.on('close', () => { closed = true; });

    if (path === '/') {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
      res.end('<!doctype html><title>oddframes</title>');
      return;
    }
    if (path === '/count') {
      const key = (url.searchParams.get('route') || '') + (url.searchParams.get('key') ? '#' + url.searchParams.get('key') : '');
      const list = counts.get(key) || [];
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify({ count: list.length, requests: list }));
      return;
    }
    if (path.startsWith('/odd/')) {
      const name = path.slice(5);
      const route = ROUTES[name];
      if (!route) { res.writeHead(404); res.end(); return; }
      count('odd/' + name, req);
      const headers = { ...SSE };
      for (const [k, v] of Object.entries(route.head?.headers || {})) {
        if (v === null) delete headers[k]; else headers[k] = v;
      }
      res.writeHead(route.head?.status || 200, headers);
      res.flushHeaders();
      for (const step of route.steps) {
        if (closed) return;
        if (typeof step === 'string') res.write(Buffer.from(step, 'latin1'));
        else await sleep(step.pause);
      }
      await sleep(20);   // the last bytes go out before the end
      if (route.end === 'destroy') res.socket?.destroy();
      else res.end();
      return;
    }
    if (path.startsWith('/seq/')) {
      const name = path.slice(5);
      const seq = SEQUENCES[name];
      if (!seq) { res.writeHead(404); res.end(); return; }
      const key = url.searchParams.get('key');
      const n = count('seq/' + name + (key ? '#' + key : ''), req);
      if (n > seq.length) { res.writeHead(204); res.end(); return; }
      res.writeHead(200, SSE);
      res.end(Buffer.from(seq[n - 1], 'latin1'));
      return;
    }
    if (path === '/longline') {
      count('longline', req);
      const total = Number(url.searchParams.get('bytes') || 10_000_000);
      res.writeHead(200, SSE);
      res.write('data: ');
      const chunk = Buffer.alloc(65536, 'x');
      let sent = 0;
      while (sent < total && !closed) {
        const n = Math.min(chunk.length, total - sent);
        const more = res.write(n === chunk.length ? chunk : chunk.subarray(0, n));
        sent += n;
        if (!more) await new Promise((r) => { res.once('drain', r); res.once('close', r); });
      }
      return;   // stays open until the client goes
    }
    if (path === '/flaky') {
      const key = url.searchParams.get('key');
      const n = count('flaky' + (key ? '#' + key : ''), req);
      const max = Number(url.searchParams.get('max') || 3);
      if (n > max) { res.writeHead(204); res.end(); return; }
      res.writeHead(200, SSE);
      const retry = url.searchParams.get('retry');
      res.end(`${retry ? `retry: ${retry}\n` : ''}id: ${n}\ndata: request ${n}\n\n`);
      return;
    }
    res.writeHead(404, { 'Content-Type': 'text/plain' });
    res.end('no such route\n');
  });
  server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });

  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      const { port: p } = server.address();
      resolve({
        url: `http://${host}:${p}`,
        port: p,
        counts,
        close: () => new Promise((r) => {
          for (const s of sockets) s.destroy();
          server.close(() => r());
        }),
      });
    });
  });
}

if (import.meta.url === pathToFileURL(process.argv[1] || '').href) {
  const srv = await start(Number(process.argv[2] || process.env.PORT || 0));
  process.stdout.write(srv.url + '\n');
  const stop = () => srv.close().then(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

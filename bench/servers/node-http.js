// Node's http module on the benchmark contract (see bench/README.md), no dependencies.
//   GET  /sub        every event published, as an SSE stream
//   POST /pub        the body becomes the data of one event sent to every subscriber; 204
//   GET  /count?n=K  K events "data: <i>", then the response ends
// Usage: node node-http.js [port]   (or PORT=...; 0 picks a free port). Prints "ready <port>".
//
// Broadcast is the idiomatic loop over a Set of responses. Its writes ignore
// backpressure, as such servers do: a slow subscriber's events wait in Node's memory.
// /count does honour it (write() false -> wait for 'drain'), as a finite stream should.
'use strict';
const http = require('http');

const subs = new Set();
const SSE_HEAD = { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' };

function sub(req, res) {
  res.writeHead(200, SSE_HEAD);
  res.flushHeaders();
  subs.add(res);
  res.on('close', () => subs.delete(res));
}

function pub(req, res) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const frame = 'data: ' + Buffer.concat(chunks).toString() + '\n\n';
    for (const s of subs) s.write(frame);
    res.writeHead(204);
    res.end();
  });
}

// Resolves on 'drain' or 'close', whichever comes first, and leaves no listener behind.
function drained(res) {
  return new Promise((resolve) => {
    const done = () => {
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.on('drain', done);
    res.on('close', done);
  });
}

async function count(req, res, n) {
  res.writeHead(200, SSE_HEAD);
  for (let i = 1; i <= n; i++) {
    if (res.destroyed) return;
    if (!res.write('data: ' + i + '\n\n')) {
      await drained(res);
    }
  }
  res.end();
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/sub' && req.method === 'GET') return sub(req, res);
  if (url.pathname === '/pub' && req.method === 'POST') return pub(req, res);
  if (url.pathname === '/count' && req.method === 'GET') {
    return count(req, res, parseInt(url.searchParams.get('n'), 10) || 0);
  }
  res.writeHead(404);
  res.end();
});
// Streams are long: no request or keep-alive timeout may end them.
server.requestTimeout = 0;
server.headersTimeout = 0;
server.keepAliveTimeout = 0;

const port = Number(process.argv[2] ?? process.env.PORT ?? 8080);
server.listen(port, '127.0.0.1', 4096, () => {
  process.stdout.write(`ready ${server.address().port}\n`);
});

// Screenshots of the demo pages for the docs, taken with headless Chromium:
//   docs/llm.png    examples/llm/server.lua: one answer done, the next one streaming
//   docs/clock.png  examples/clock.lua after a tick
//   docs/chat.png   examples/chat/server.lua: ann's page, bob online, a short conversation
//   docs/status.png app:status_page (test/browser/fixtures/status.lua) after 76 s of load
//                   from here: streams opened and closed, publishes at a varying rate, one
//                   slow client dropped
// Run by hand (not part of the test run), from the top of the tree, after
// bash scripts/setup-browser.sh:   node test/browser/screenshots.mjs
import http from 'node:http';
import net from 'node:net';
import { join } from 'node:path';
import { startLua, launchBrowser, newPage, cleanup, waitFor, sleep, ROOT } from './lib.mjs';

const out = (name) => join(ROOT, 'docs', name);

async function llm(browser) {
  const srv = await startLua('examples/llm/server.lua', { TOKEN_DELAY: '0.03' });
  const page = await newPage(browser, { viewport: { width: 900, height: 1060 } });
  await page.goto(`${srv.url}/`);
  const answer = () => page.locator('.msg.assistant .text').last();

  await page.locator('#prompt').fill('What is lua-sse?');
  await page.locator('#prompt').press('Enter');
  await page.waitForFunction(() => document.querySelector('.msg.assistant:last-child')?.dataset.state === 'done',
    null, { timeout: 20_000 });

  await page.locator('#prompt').fill('And how do the tokens reach this page?');
  await page.locator('#send').click();
  // Mid-way: about half of the second answer shown, the cursor still blinking.
  await waitFor(async () => (await answer().textContent()).length > 220, 20_000, 'second answer half-way');
  await page.screenshot({ path: out('llm.png') });
  console.log('wrote docs/llm.png');
  await page.context().close();
  await srv.stop();
}

async function clock(browser) {
  const srv = await startLua('examples/clock.lua');
  const page = await newPage(browser, { viewport: { width: 800, height: 320 } });
  await page.goto(`${srv.url}/`);
  // "live, event id …" once a tick arrived; wait for a second one so the time has moved.
  await page.waitForFunction(() => document.getElementById('state').textContent.startsWith('live'),
    null, { timeout: 5_000 });
  const first = await page.locator('#time').textContent();
  await waitFor(async () => (await page.locator('#time').textContent()) !== first, 3_000, 'a second tick');
  await page.screenshot({ path: out('clock.png') });
  console.log('wrote docs/clock.png');
  await page.context().close();
  await srv.stop();
}

async function chat(browser) {
  const srv = await startLua('examples/chat/server.lua');
  const ann = await newPage(browser, { viewport: { width: 900, height: 640 } });
  const bob = await newPage(browser, { viewport: { width: 900, height: 640 } });
  await ann.goto(`${srv.url}/?user=ann&topics=lobby,dev`);
  await bob.goto(`${srv.url}/?user=bob&topics=lobby`);
  const say = async (room, user, text) => {
    const res = await fetch(`${srv.url}/rooms/${room}/messages`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ user, text }),
    });
    if (res.status !== 201) throw new Error(`post failed: ${res.status}`);
  };
  await waitFor(async () => (await ann.locator('body').textContent()).includes('bob'), 5_000, 'bob online');
  await say('lobby', 'bob', 'hi ann, the stream is live');
  await say('lobby', 'ann', 'hello bob! events arrive the moment they are published');
  await say('dev', 'ann', 'replay after a dropped connection works too');
  await waitFor(async () => (await ann.locator('body').textContent()).includes('replay after'), 5_000, 'messages');
  await ann.screenshot({ path: out('chat.png') });
  console.log('wrote docs/chat.png');
  await ann.context().close();
  await bob.context().close();
  await srv.stop();
}

async function status(browser) {
  const srv = await startLua('test/browser/fixtures/status.lua',
    { CHANNELS: 'prices,news,chat,alerts', QUEUE_LIMIT: '131072' });
  const page = await newPage(browser, { viewport: { width: 1100, height: 660 } });
  await page.goto(`${srv.url}/status`);
  await page.waitForFunction(() => document.getElementById('state').textContent === 'live', null, { timeout: 5_000 });

  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  const streams = [];
  const open = (channel, n) => {
    for (let i = 0; i < n; i++) {
      const req = http.get(`${srv.url}/ch/${encodeURIComponent(channel)}`, { agent }, (res) => res.resume());
      req.on('error', () => {});
      streams.push({ channel, req });
    }
  };
  const close = (channel, n) => {
    for (const s of streams.filter((x) => x.channel === channel && !x.closed).slice(0, n)) {
      s.req.destroy();
      s.closed = true;
    }
  };
  const post = (channel, q = '', body = 'tick') => fetch(`${srv.url}/ch/${encodeURIComponent(channel)}?${q}`,
    { method: 'POST', body }).then((r) => r.arrayBuffer()).catch(() => {});

  // First a client that stops reading, dropped by a burst of big alerts (its bytes/s spike
  // scrolls out of the charts' minute); then a minute of load: streams opening in waves
  // and some closing, prices at a rate that swings, news now and then, a burst of chat.
  const t0 = Date.now();
  const secs = () => (Date.now() - t0) / 1000;
  let running = true;
  const prices = (async () => {
    while (running) {
      const n = Math.max(1, Math.round(3 + 2.5 * Math.sin(secs() / 7)));
      await post('prices', `count=${n}`, JSON.stringify({ sym: 'LUA', px: 100 + Math.sin(secs()) }));
      await sleep(40);
    }
  })();
  const plan = [
    [3, () => { burst = waitFor(async () => {   // alerts big enough to drop the slow client
      await post('alerts', 'count=2&size=40000');
      return Number(await page.locator('#dropped').getAttribute('data-value')) >= 1;
    }, 15_000, 'the slow client dropped', 20).catch((e) => e); }],
    [18, () => open('prices', 12)], [22, () => open('news', 8)], [26, () => open('prices', 10)],
    [30, () => open('chat', 6)], [34, () => open('prices', 14)], [40, () => open('news', 10)],
    [46, () => close('prices', 12)], [52, () => open('alerts', 3)], [56, () => close('news', 9)],
    [62, () => open('prices', 8)], [68, () => open('chat', 4)],
  ];
  const slow = net.connect(srv.port, '127.0.0.1', () => {
    slow.write('GET /ch/alerts HTTP/1.1\r\nHost: x\r\n\r\n');
    slow.pause();
  });
  slow.on('error', () => {});
  let news = 0;
  let burst;
  while (secs() < 76) {
    while (plan.length && plan[0][0] <= secs()) plan.shift()[1]();
    if (Math.floor(secs()) > news) { news = Math.floor(secs()); await post('news'); }
    if (secs() > 32 && secs() < 44) await post('chat', 'count=5', 'hello');
    await sleep(100);
  }
  const dropped = await burst;
  if (dropped instanceof Error) throw dropped;
  await sleep(1_100);   // one more sample after the last change
  await page.screenshot({ path: out('status.png'), fullPage: true });
  console.log('wrote docs/status.png');
  running = false;
  await prices;
  slow.destroy();
  close('prices', Infinity); close('news', Infinity); close('chat', Infinity); close('alerts', Infinity);
  agent.destroy();
  await page.context().close();
  await srv.stop();
}

try {
  const browser = await launchBrowser();
  await llm(browser);
  await clock(browser);
  await chat(browser);
  await status(browser);
} finally {
  await cleanup();
}

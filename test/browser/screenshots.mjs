// Screenshots of the demo pages for the docs, taken with headless Chromium:
//   docs/llm.png    examples/llm/server.lua: one answer done, the next one streaming
//   docs/clock.png  examples/clock.lua after a tick
//   docs/chat.png   examples/chat/server.lua: ann's page, bob online, a short conversation
// Run by hand (not part of the test run), from the top of the tree, after
// bash scripts/setup-browser.sh:   node test/browser/screenshots.mjs
import { join } from 'node:path';
import { startLua, launchBrowser, newPage, cleanup, waitFor, ROOT } from './lib.mjs';

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

try {
  const browser = await launchBrowser();
  await llm(browser);
  await clock(browser);
  await chat(browser);
} finally {
  await cleanup();
}

// The LLM-style streaming demo (examples/llm/server.lua + index.html):
// (a) the API as a client of a hosted LLM API sees it, with Node's fetch;
// (b) the page in Chromium, rendering the answer while it streams.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startLua, launchBrowser, newPage, cleanup, readSSE, waitFor } from './lib.mjs';

const DELAY = 0.04;                     // seconds per token (TOKEN_DELAY)
let srv;
let api;

before(async () => {
  srv = await startLua('examples/llm/server.lua', { TOKEN_DELAY: String(DELAY) });
  api = `${srv.url}/v1/chat/completions`;
});
after(cleanup);

const post = (body, { signal = AbortSignal.timeout(15_000), headers = {} } = {}) => fetch(api, {
  method: 'POST',
  headers: { 'Content-Type': 'application/json', ...headers },
  body: typeof body === 'string' ? body : JSON.stringify(body),
  signal,
});
const chat = (prompt, extra = {}) => ({
  model: 'test-model', messages: [{ role: 'user', content: prompt }], stream: true, ...extra,
});

// The full answer, asked without streaming: one chat.completion object.
async function fullAnswer(prompt) {
  const res = await post(chat(prompt, { stream: false }));
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(body.object, 'chat.completion');
  assert.equal(body.choices[0].finish_reason, 'stop');
  return body.choices[0].message.content;
}

// Streams one chat completion; returns the parsed chunks, their arrival times and more.
async function streamChat(prompt, extra) {
  const t0 = Date.now();
  const res = await post(chat(prompt, extra));
  if (res.status !== 200) assert.fail(`status ${res.status}: ${await res.text()}`);
  assert.match(res.headers.get('content-type'), /^text\/event-stream/);
  assert.equal(res.headers.get('cache-control'), 'no-cache');
  const { events, ended, rest } = await readSSE(res, { timeout: 20_000 });
  const headersAt = Date.now() - t0;
  return { res, events, ended, rest, headersAt };
}

test('a streamed completion: role first, word tokens with their spaces, stop, [DONE], end', { timeout: 30_000 }, async () => {
  const prompt = 'Why do  tokens keep their spaces?';
  const answer = await fullAnswer(prompt);
  assert.ok(answer.startsWith(`You said: "${prompt}".\n\n`), answer);

  const { events, ended, rest } = await streamChat(prompt);
  assert.equal(ended, true, 'the body should end after [DONE]');
  assert.equal(rest, '', 'bytes after the last event');
  assert.ok(events.every((e) => e.type === 'message'), 'only unnamed events');
  const last = events.pop();
  assert.equal(last.data, '[DONE]', '[DONE] comes last');
  assert.ok(!events.some((e) => e.data === '[DONE]'), '[DONE] only once');

  const chunks = events.map((e) => JSON.parse(e.data));
  const id = chunks[0].id;
  assert.match(id, /^chatcmpl-[0-9a-zA-Z]+$/);
  for (const c of chunks) {
    assert.equal(c.id, id, 'one id for the whole completion');
    assert.equal(c.object, 'chat.completion.chunk');
    assert.equal(c.model, 'test-model');
    assert.equal(typeof c.created, 'number');
    assert.ok(Math.abs(c.created - Date.now() / 1000) < 60, 'created is a unix time in seconds');
    assert.equal(c.choices.length, 1);
    assert.equal(c.choices[0].index, 0);
  }
  // First: the role. Last: an empty delta with finish_reason "stop". Between: content.
  assert.equal(chunks[0].choices[0].delta.role, 'assistant');
  assert.equal(chunks[0].choices[0].finish_reason, null);
  const end = chunks.pop();
  assert.deepEqual(end.choices[0].delta, {});
  assert.equal(end.choices[0].finish_reason, 'stop');
  const tokens = chunks.slice(1).map((c) => {
    assert.equal(c.choices[0].finish_reason, null);
    assert.deepEqual(Object.keys(c.choices[0].delta), ['content']);
    return c.choices[0].delta.content;
  });
  assert.ok(tokens.length > 20, `only ${tokens.length} tokens`);
  assert.equal(tokens.join(''), answer, 'the tokens joined are the full answer');
  // Word tokens that keep their leading whitespace: exactly the text cut before each word.
  assert.deepEqual(tokens, answer.match(/\s*\S+/g));
  assert.ok(tokens.slice(1).every((t) => /^\s/.test(t)), 'every token after the first starts with its space');
  assert.ok(tokens.includes('  tokens'), 'two spaces before a word are kept');
});

test('tokens arrive spread over time (streamed, not buffered)', { timeout: 30_000 }, async () => {
  const { events } = await streamChat('timing');
  const tokens = events.filter((e) => e.data !== '[DONE]' && JSON.parse(e.data).choices[0].delta.content);
  const n = tokens.length;
  const first = tokens[0].at;
  const lastAt = tokens[n - 1].at;
  const ideal = (n - 1) * DELAY * 1000;
  assert.ok(lastAt - first >= ideal * 0.8, `tokens ${n}: first at ${first} ms, last at ${lastAt} ms (ideal spread ${ideal} ms)`);
  assert.ok(first < lastAt / 4, `first token at ${first} ms, last at ${lastAt} ms`);
  // They come one by one: most tokens arrive at a different time from the one before.
  const apart = tokens.slice(1).filter((t, i) => t.at - tokens[i].at >= DELAY * 1000 / 2).length;
  assert.ok(apart >= (n - 1) * 0.7, `only ${apart} of ${n - 1} gaps were >= ${DELAY * 500} ms`);
});

test('two completions at once stream side by side', { timeout: 30_000 }, async () => {
  const t0 = Date.now();
  const [a, b] = await Promise.all([streamChat('first'), streamChat('second')]);
  const took = Date.now() - t0;
  const n = a.events.length - 3;
  assert.ok(took < n * DELAY * 1000 * 1.7, `two streams of ${n} tokens took ${took} ms: served one after the other?`);
  assert.ok(a.events.at(-2).data.includes('"stop"') && b.events.at(-2).data.includes('"stop"'));
});

test('max_tokens cuts the answer with finish_reason "length"; include_usage adds a usage chunk', { timeout: 30_000 }, async () => {
  const { events } = await streamChat('short', { max_tokens: 3, stream_options: { include_usage: true } });
  const chunks = events.slice(0, -1).map((e) => JSON.parse(e.data));
  assert.equal(events.at(-1).data, '[DONE]');
  const usage = chunks.pop();
  assert.deepEqual(usage.choices, []);
  assert.deepEqual(usage.usage, { prompt_tokens: 1, completion_tokens: 3, total_tokens: 4 });
  assert.equal(chunks.at(-1).choices[0].finish_reason, 'length');
  const text = chunks.map((c) => c.choices[0].delta.content ?? '').join('');
  assert.equal(text, 'You said: "short".');
});

test('bad requests get 400 with a JSON error, before any stream starts', { timeout: 30_000 }, async () => {
  const bad = [
    ['', /JSON object/],
    ['{"messages": [', /not valid JSON/],
    ['[1, 2]', /JSON object/],
    ['{"model": "x", "stream": true}', /'messages' is required/],
    ['{"messages": [], "stream": true}', /non-empty array/],
    ['{"messages": [{"role": "user"}], "stream": true}', /messages\[0\]/],
    ['{"messages": [{"role": "user", "content": "x"}], "stream": true, "max_tokens": 0}', /max_tokens/],
  ];
  for (const [body, message] of bad) {
    const res = await post(body);
    assert.equal(res.status, 400, `body ${JSON.stringify(body)}`);
    assert.match(res.headers.get('content-type'), /^application\/json/);
    const json = await res.json();
    assert.equal(json.error.type, 'invalid_request_error');
    assert.match(json.error.message, message, `body ${JSON.stringify(body)}`);
  }
  const get = await fetch(api, { signal: AbortSignal.timeout(5_000) });
  assert.equal(get.status, 405);
  assert.equal(get.headers.get('allow'), 'POST');
  await get.arrayBuffer();
});

test('a client that leaves mid-answer does not disturb the server', { timeout: 30_000 }, async () => {
  const ctrl = new AbortController();
  const res = await post(chat('leaving early'), { signal: ctrl.signal });
  let n = 0;
  const { events, ended } = await readSSE(res, { timeout: 10_000, stopWhen: () => ++n === 3 });
  assert.equal(events.length, 3);
  assert.equal(ended, false);
  ctrl.abort();
  const answer = await fullAnswer('still there?');
  assert.ok(answer.startsWith('You said: "still there?"'));
  const { events: again } = await streamChat('and streaming?');
  assert.equal(again.at(-1).data, '[DONE]');
  assert.equal(srv.exited(), null, `server exited:\n${srv.output()}`);
});

test('the page renders the answer while it streams', { timeout: 60_000 }, async () => {
  const prompt = 'Tell me about  Server-Sent Events 😀';
  const expected = await fullAnswer(prompt);
  const browser = await launchBrowser();
  const page = await newPage(browser);
  await page.goto(`${srv.url}/`);
  await page.locator('#prompt').fill(prompt);
  // Record every text the answer shows, from the first mutation on.
  await page.evaluate(() => {
    window.seen = [];
    new MutationObserver(() => {
      const el = [...document.querySelectorAll('.msg.assistant .text')].pop();
      if (el) window.seen.push(el.textContent);
    }).observe(document.getElementById('log'), { subtree: true, childList: true, characterData: true });
  });
  await page.locator('#send').click();

  const answer = page.locator('.msg.assistant .text').last();
  // Partly there: some tokens shown, not all of them yet.
  await page.waitForFunction((full) => {
    const el = [...document.querySelectorAll('.msg.assistant .text')].pop();
    return el && el.textContent.length > 0 && el.textContent.length < full.length / 2;
  }, expected, { timeout: 10_000 });
  const partial = await answer.textContent();
  assert.ok(expected.startsWith(partial) && partial.length < expected.length, `partial ${JSON.stringify(partial)}`);
  assert.equal(await page.locator('.msg.assistant').last().getAttribute('data-state'), 'streaming');

  await page.waitForFunction(() => document.querySelector('.msg.assistant:last-child')?.dataset.state !== 'streaming',
    null, { timeout: 20_000 });
  assert.equal(await page.locator('.msg.assistant').last().getAttribute('data-state'), 'done',
    await page.locator('.msg.assistant .meta').last().textContent());
  assert.equal(await answer.textContent(), expected);
  assert.match(await page.locator('.msg.assistant .meta').last().textContent(), /finish_reason: stop/);
  assert.equal(await page.locator('.msg.user .text').last().textContent(), prompt);

  const seen = await page.evaluate(() => window.seen);
  const partials = seen.filter((t) => t.length > 0 && t.length < expected.length);
  assert.ok(partials.length >= 10, `only ${partials.length} partial renderings`);
  assert.ok(partials.every((t) => expected.startsWith(t)), 'every rendering is a prefix of the answer');
  assert.deepEqual(page.errors, []);
  await browser.close();
});

test('the page stops mid-answer, then answers the next prompt', { timeout: 60_000 }, async () => {
  const browser = await launchBrowser();
  const page = await newPage(browser);
  await page.goto(`${srv.url}/`);
  await page.locator('#prompt').fill('stop me');
  await page.locator('#prompt').press('Enter');
  const answer = () => page.locator('.msg.assistant .text').last();
  await waitFor(async () => (await answer().textContent()).length > 10, 10_000, 'first tokens');
  await page.locator('#stop').click();
  await page.waitForFunction(() => document.querySelector('.msg.assistant:last-child')?.dataset.state === 'stopped',
    null, { timeout: 5_000 });
  const stoppedAt = await answer().textContent();
  const full = await fullAnswer('stop me');
  assert.ok(full.startsWith(stoppedAt) && stoppedAt.length < full.length, `stopped at ${JSON.stringify(stoppedAt)}`);
  await new Promise((r) => setTimeout(r, 5 * DELAY * 1000));
  assert.equal(await answer().textContent(), stoppedAt, 'no tokens shown after stop');

  const expected = await fullAnswer('and now all');
  await page.locator('#prompt').fill('and now all');
  await page.locator('#send').click();
  await page.waitForFunction(() => document.querySelectorAll('.msg.assistant').length === 2 &&
    document.querySelector('.msg.assistant:last-child').dataset.state === 'done', null, { timeout: 20_000 });
  assert.equal(await answer().textContent(), expected);
  assert.deepEqual(page.errors, []);
  await browser.close();
});

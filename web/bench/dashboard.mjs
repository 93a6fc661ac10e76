// Dashboard figures in a real browser (Debian's Chromium): the VM list's
// first render with 200 VMs, and how long a state change takes from the
// daemon's event to the page. Run by `quetzal-bench dashboard`, which
// starts quetzald and passes QUETZAL_URL, QUETZAL_TOKEN and RUNS.

import { launch } from '../tests/browser.mjs';

const url = process.env.QUETZAL_URL;
const token = process.env.QUETZAL_TOKEN;
const runs = Number(process.env.RUNS ?? 10);
const VMS = 200;

async function call(method, path, body) {
  const response = await fetch(`${url}/api/v1${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`);
  return response.status === 204 ? null : response.json();
}

function summary(samples) {
  const sorted = [...samples].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  return `${median.toFixed(0)} ms (${sorted[0].toFixed(0)}–${sorted.at(-1).toFixed(0)})`;
}

console.error(`bench: creating ${VMS} VMs`);
for (let i = 0; i < VMS; i += 1) {
  await call('POST', '/vms', { name: `list-${String(i).padStart(3, '0')}`, memory_mib: 128 });
}
await call('POST', '/vms', { name: 'latency', memory_mib: 128 });
await call('POST', '/vms/latency/start');

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const login = await context.newPage();
  await login.goto(url);
  await login.getByLabel('API token').fill(token);
  await login.getByRole('button', { name: 'Log in' }).click();
  await login.getByRole('heading', { name: 'Overview' }).waitFor();
  await login.close();

  console.error(`bench: VM list first render, ${runs} page loads`);
  const renders = [];
  for (let run = 0; run < runs; run += 1) {
    const page = await context.newPage();
    await page.goto(`${url}/#/vms`, { waitUntil: 'commit' });
    // performance.now() counts from the start of the navigation.
    const at = await page.waitForFunction(
      (count) => document.querySelectorAll('[data-vm]').length >= count && performance.now(),
      VMS + 1,
      { polling: 'raf', timeout: 30_000 },
    );
    renders.push(await at.jsonValue());
    await page.close();
  }

  console.error(`bench: state change from event to page, ${runs} pause/resume`);
  const page = await context.newPage();
  await page.goto(`${url}/#/vms`);
  await page.locator('[data-vm="latency"] [data-state="running"]').waitFor({ timeout: 60_000 });
  await page.evaluate(() => {
    window.seen = [];
    new MutationObserver(() => {
      const badge = document.querySelector('[data-vm="latency"] [data-state]');
      const state = badge?.dataset.state;
      if (state && state !== window.seen.at(-1)?.state) window.seen.push({ state, at: Date.now() });
    }).observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true });
  });
  const delays = [];
  for (let run = 0; run < runs; run += 1) {
    const action = run % 2 === 0 ? 'pause' : 'resume';
    const state = action === 'pause' ? 'paused' : 'running';
    await call('POST', `/vms/latency/${action}`);
    const seenAt = await page.waitForFunction(
      (want) => window.seen.findLast((s) => s.state === want)?.at,
      state,
      { timeout: 10_000 },
    );
    const events = await call('GET', '/events?vm=latency&limit=1000');
    const event = events.events.findLast((e) => e.kind === (action === 'pause' ? 'paused' : 'resumed'));
    delays.push((await seenAt.jsonValue()) - event.at);
    await page.evaluate(() => {
      window.seen = window.seen.slice(-1);
    });
  }

  console.log('| dashboard | median (min–max) | target |');
  console.log('|---|---|---|');
  console.log(`| VM list first render, ${VMS + 1} VMs (navigation → all rows) | ${summary(renders)} | ≤ 1000 ms |`);
  console.log(`| state change, daemon event → page | ${summary(delays)} | ≤ 1000 ms |`);
} finally {
  await browser.close();
  await call('POST', '/vms/latency/force-stop').catch(() => {});
}

// The graphical console in headless Chromium: Quetzal's full-window
// desktop page (quetzald's WebSocket relay, the dashboard's noVNC) against
// noVNC through websockify to the same QEMU (REFERENCE_URL), one client
// connected at a time, alternating. Run by `quetzal-bench console`, which
// starts the desktop VM with a maximized terminal (QUETZAL_VM).
//
// - input to screen: a key pressed in the page until the canvas changes
//   (the shell echoing it), 10 keys a connection;
// - frames per second: distinct canvas states a second while a second
//   terminal prints `seq` at 1024×768, over 5 s a connection.
//
// Prints Markdown tables: median (min–max), the reference, the ratio.

import assert from 'node:assert/strict';
import { launch } from '../tests/browser.mjs';

const url = process.env.QUETZAL_URL;
const token = process.env.QUETZAL_TOKEN;
const vm = process.env.QUETZAL_VM;
const reference = process.env.REFERENCE_URL;
const runs = Number(process.env.RUNS ?? 5);
assert.ok(url && token && vm && reference, 'QUETZAL_URL, QUETZAL_TOKEN, QUETZAL_VM and REFERENCE_URL are set');

const SIZE = { width: 1024, height: 768 };
const KEYS = 10;
const WINDOW_MS = 5000;

async function exec(command, args) {
  const response = await fetch(`${url}/api/v1/vms/${encodeURIComponent(vm)}/exec`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ command, args }),
  });
  const done = await response.json();
  assert.equal(done.exit_code, 0, `${command} ${args.join(' ')}: ${JSON.stringify(done)}`);
}

// Installed in each page: hashes of the canvas, by rows or whole.
function instrument() {
  const hash = (data, step) => {
    let h = 2166136261;
    for (let i = 0; i < data.length; i += step) h = Math.imul(h ^ data[i], 16777619);
    return h;
  };
  const canvas = () => document.querySelector('canvas');
  const whole = () => {
    const c = canvas();
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    return hash(new Uint32Array(d.buffer), 1);
  };
  // Three full-width bands of 4 rows: a scrolling screen changes them all.
  const bands = () => {
    const c = canvas();
    const ctx = c.getContext('2d');
    let h = 0;
    for (const y of [0.25, 0.5, 0.75]) {
      const d = ctx.getImageData(0, Math.floor(c.height * y), c.width, 4).data;
      h = Math.imul(h ^ hash(new Uint32Array(d.buffer), 1), 31);
    }
    return h;
  };
  const frame = () => new Promise((resolve) => requestAnimationFrame(resolve));
  window.__size = () => ({ width: canvas()?.width ?? 0, height: canvas()?.height ?? 0 });
  // Resolves with ms from the next keydown to the first changed canvas;
  // null when nothing changed within 10 s (or the canvas could not be
  // read: it is briefly empty while the screen changes size).
  window.__armKey = () =>
    new Promise((resolve) => {
      const before = whole();
      const gaveUp = setTimeout(() => resolve(null), 12_000);
      window.addEventListener(
        'keydown',
        async (e) => {
          const t0 = e.timeStamp;
          try {
            for (;;) {
              const now = await frame();
              if (whole() !== before) return resolve(now - t0);
              if (now - t0 > 10_000) return resolve(null);
            }
          } catch {
            return resolve(null);
          } finally {
            clearTimeout(gaveUp);
          }
        },
        { once: true, capture: true },
      );
    });
  window.__fps = async (ms) => {
    let last = bands();
    let changes = 0;
    const start = await frame();
    for (;;) {
      const now = await frame();
      const h = bands();
      if (h !== last) changes += 1;
      last = h;
      if (now - start >= ms) return (changes * 1000) / (now - start);
    }
  };
}

const browser = await launch();
const context = await browser.newContext({ viewport: SIZE });

// Logs in once: the session cookie serves every later page.
{
  const page = await context.newPage();
  await page.goto(url);
  await page.getByLabel('API token').fill(token);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('heading', { name: 'Overview' }).waitFor();
  await page.close();
}

const clients = {
  quetzal: async (page) => {
    await page.goto(`${url}/#/desktop/${encodeURIComponent(vm)}`);
    await page.getByTestId('desktop').locator('canvas').waitFor();
    await page.getByRole('status').waitFor({ state: 'detached' });
  },
  websockify: async (page) => {
    await page.goto(reference);
    await page.waitForFunction(() => document.title === 'connected');
  },
};

async function connect(which) {
  console.error(`console: connecting ${which}`);
  const page = await context.newPage();
  await page.addInitScript(instrument);
  await clients[which](page);
  await page.waitForFunction(
    (size) => window.__size().width === size.width && window.__size().height === size.height,
    SIZE,
    { timeout: 120_000 },
  );
  return page;
}

const latency = { quetzal: [], websockify: [] };
const fps = { quetzal: [], websockify: [] };

for (let run = 0; run < runs; run += 1) {
  for (const which of ['quetzal', 'websockify']) {
    const page = await connect(which);
    await page.mouse.click(SIZE.width / 2, SIZE.height / 2);
    for (let k = 0; k < KEYS; k += 1) {
      const armed = page.evaluate(() => window.__armKey());
      await page.keyboard.press('KeyX');
      const ms = await armed;
      console.error(`console: ${which} run ${run + 1} key ${k + 1}: ${ms === null ? 'no change in 10 s' : `${ms.toFixed(0)} ms`}`);
      if (ms !== null) latency[which].push(ms);
    }
    await page.keyboard.press('Control+KeyU');
    await page.close();
  }
}

const flood = ['--unit=qzb-flood', '--uid=debian', '--setenv=DISPLAY=:0', '--setenv=XAUTHORITY=/home/debian/.Xauthority',
  'xfce4-terminal', '--disable-server', '--maximize', '-x', 'seq', '999999999'];
await exec('systemd-run', flood);
try {
  for (let run = 0; run < runs; run += 1) {
    for (const which of ['quetzal', 'websockify']) {
      const page = await connect(which);
      fps[which].push(await page.evaluate((ms) => window.__fps(ms), WINDOW_MS));
      console.error(`console: ${which} run ${run + 1}: ${fps[which].at(-1).toFixed(1)} fps`);
      await page.close();
    }
  }
} finally {
  await exec('systemctl', ['stop', 'qzb-flood']);
  await browser.close();
}

const sorted = (xs) => [...xs].sort((a, b) => a - b);
const median = (xs) => sorted(xs)[Math.floor(xs.length / 2)];
const pct = (xs, p) => sorted(xs)[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)];
const spread = (xs, f) => `${f(median(xs))} (${f(sorted(xs)[0])}–${f(sorted(xs).at(-1))})`;
const ms = (x) => `${x.toFixed(0)} ms`;
const perSec = (x) => `${x.toFixed(1)} fps`;

console.log(`| desktop VM, 1024×768, under TCG (${runs} connections each, alternating) | Quetzal: median (min–max) | websockify + noVNC | ratio |`);
console.log('|---|---|---|---|');
console.log(
  `| frames per second, a terminal printing \`seq\` (5 s a connection) | ${spread(fps.quetzal, perSec)} | ${spread(fps.websockify, perSec)} | ${(median(fps.quetzal) / median(fps.websockify)).toFixed(2)} |`,
);
console.log(
  `| key → echoed on the canvas, p50 (${latency.quetzal.length} keys / ${latency.websockify.length}) | ${ms(median(latency.quetzal))} | ${ms(median(latency.websockify))} | ${(median(latency.quetzal) / median(latency.websockify)).toFixed(2)} |`,
);
console.log(
  `| key → echoed on the canvas, p90 | ${ms(pct(latency.quetzal, 90))} | ${ms(pct(latency.websockify, 90))} | ${(pct(latency.quetzal, 90) / pct(latency.websockify, 90)).toFixed(2)} |`,
);

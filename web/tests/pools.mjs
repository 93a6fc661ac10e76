// The Desktop pools page and a pool desktop's full-window page (Debian's
// Chromium, driven by playwright-core), against a quetzald whose pool
// QUETZAL_POOL is making its spares. Run by crates/cli/tests/pools.rs.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { launch } from './browser.mjs';

const url = process.env.QUETZAL_URL;
const token = process.env.QUETZAL_TOKEN;
const pool = process.env.QUETZAL_POOL;
// A desktop assigned before: typed into last, while the test watches its
// CPU weight.
const typist = process.env.QUETZAL_TYPE_VM;
const shots = process.env.SCREENSHOTS;
assert.ok(url && token && pool && shots, 'QUETZAL_URL, QUETZAL_TOKEN, QUETZAL_POOL and SCREENSHOTS are set');
mkdirSync(shots, { recursive: true });

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  await page.goto(url);
  await page.getByLabel('API token').fill(token);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('heading', { name: 'Overview' }).waitFor();
  await page.getByRole('link', { name: 'Desktop pools' }).click();
  await page.getByRole('heading', { name: 'Desktop pools' }).waitFor();

  // The spares become ready while the page is open: it follows the
  // event stream, nobody reloads it.
  const card = page.locator(`[data-pool="${pool}"]`);
  await card.getByTestId('ready').filter({ hasText: '2' }).waitFor({ timeout: 180_000 });
  console.log('pools: the page showed two ready spares live');

  await card.getByLabel(`User for ${pool}`).fill('web-user');
  await card.getByRole('button', { name: 'Assign a desktop' }).click();
  const assigned = card.getByText(/for web-user:/);
  await assigned.waitFor();
  const vm = (await assigned.textContent()).split(' ')[0];
  const row = card.locator(`[data-desktop="${vm}"]`);
  await row.getByText('web-user').waitFor();
  await page.screenshot({ path: `${shots}/pools.png` });
  console.log(`pools: assigned ${vm} to web-user`);

  // Its full-window page: the screen on the whole window, no dashboard.
  const [desktop] = await Promise.all([
    context.waitForEvent('page'),
    card.getByRole('link', { name: 'open full-window' }).click(),
  ]);
  await desktop.waitForURL(`**/#/desktop/${vm}`);
  const canvas = desktop.getByTestId('desktop').locator('canvas');
  await canvas.waitFor();
  await desktop.getByRole('status').waitFor({ state: 'detached' });
  assert.equal(await desktop.locator('nav').count(), 0, 'no dashboard navigation on the desktop page');
  const box = await desktop.getByTestId('desktop').boundingBox();
  assert.ok(box.width === 1280 && box.height === 900, `the screen area is ${box.width}x${box.height}, not the window`);
  assert.equal(await desktop.title(), `${vm} · Quetzal`);
  await desktop.screenshot({ path: `${shots}/pool-desktop.png` });
  console.log('pools: the desktop page fills the window');
  await desktop.close();

  // Released from the page: the desktop goes from the list.
  await row.getByRole('button', { name: 'Release' }).click();
  await row.waitFor({ state: 'detached' });
  console.log(`pools: released ${vm}`);

  // Typing on a desktop's page changes its screen (and makes it the
  // active desktop: the test then checks its CPU weight).
  const typing = await context.newPage();
  await typing.goto(`${url}/#/desktop/${typist}`);
  await typing.getByTestId('desktop').locator('canvas').waitFor();
  await typing.getByRole('status').waitFor({ state: 'detached' });
  const pixels = () =>
    typing.evaluate(() => {
      const c = document.querySelector('[data-testid="desktop"] canvas');
      return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
    });
  // The shell on the screen is up once its prompt is drawn: wait until
  // two looks a second apart agree (a quiet screen), then type.
  let before = await pixels();
  for (let settled = false; !settled; ) {
    await typing.waitForTimeout(1000);
    const now = await pixels();
    settled = now.every((v, i) => v === before[i]);
    before = now;
  }
  await typing.getByTestId('desktop').click();
  await typing.keyboard.type('echo typed-here');
  await typing.keyboard.press('Enter');
  const deadline = Date.now() + 30_000;
  let changed = 0;
  while (changed < 200 && Date.now() < deadline) {
    await typing.waitForTimeout(250);
    const now = await pixels();
    changed = now.reduce((n, v, i) => n + (v !== before[i] ? 1 : 0), 0);
  }
  await typing.screenshot({ path: `${shots}/pool-desktop-typed.png` });
  assert.ok(changed >= 200, `typing changed only ${changed} pixel values on ${typist}'s screen`);
  console.log(`pools: typing on ${typist}'s page changed ${changed} pixel values`);
  console.log('pools: all passed');
} finally {
  await browser.close();
}

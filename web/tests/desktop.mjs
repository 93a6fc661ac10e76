// The desktop image's screen in the dashboard (Debian's Chromium, driven
// by playwright-core): the Screen tab of VM QUETZAL_VM shows a graphical
// desktop, not a text console. Run by crates/cli/tests/desktop.rs.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { launch } from './browser.mjs';

const url = process.env.QUETZAL_URL;
const token = process.env.QUETZAL_TOKEN;
const vm = process.env.QUETZAL_VM;
const shots = process.env.SCREENSHOTS;
assert.ok(url && token && vm && shots, 'QUETZAL_URL, QUETZAL_TOKEN, QUETZAL_VM and SCREENSHOTS are set');
mkdirSync(shots, { recursive: true });

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  await page.goto(url);
  await page.getByLabel('API token').fill(token);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('heading', { name: 'Overview' }).waitFor();
  await page.goto(`${url}/#/vms/${vm}`);
  await page.getByRole('tab', { name: 'Screen' }).click();
  await page.getByText('Screen · connected').waitFor();
  const canvas = page.getByTestId('screen').locator('canvas');
  await canvas.waitFor();

  // A text console is VGA text mode (720×400), mostly black in a handful
  // of colours; a desktop is a framebuffer of at least 800×600, mostly
  // not black (wallpaper, panel), in many colours.
  const look = () =>
    page.evaluate(() => {
      const c = document.querySelector('[data-testid="screen"] canvas');
      const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      const colours = new Set();
      let dark = 0;
      for (let i = 0; i < data.length; i += 4) {
        colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        if (data[i] + data[i + 1] + data[i + 2] < 48) dark += 1;
      }
      return { width: c.width, height: c.height, colours: colours.size, dark: dark / (data.length / 4) };
    });
  const deadline = Date.now() + 60_000;
  let seen = await look();
  while (!(seen.width >= 800 && seen.colours >= 64 && seen.dark < 0.5) && Date.now() < deadline) {
    await page.waitForTimeout(500);
    seen = await look();
  }
  console.log(`desktop: screen ${seen.width}x${seen.height}, ${seen.colours} colours, ${(seen.dark * 100).toFixed(0)}% dark`);
  await page.screenshot({ path: `${shots}/desktop-screen.png` });
  assert.ok(seen.width >= 800 && seen.height >= 600, `the screen is ${seen.width}x${seen.height}: a text console`);
  assert.ok(seen.colours >= 64, `the screen has only ${seen.colours} colours: not a desktop`);
  assert.ok(seen.dark < 0.5, `${(seen.dark * 100).toFixed(0)}% of the screen is dark: not a desktop`);
  console.log('desktop: all passed');
} finally {
  await browser.close();
}

// The full-window desktop page of a desktop VM (QUETZAL_VM, with a
// maximized terminal on its screen) in Debian's Chromium: the guest's
// screen takes the window's size and follows it when the window changes,
// keys reach the guest as the guest's layout reads them (Shift included),
// and the clipboard crosses both ways. Run by crates/cli/tests/desktop.rs,
// which then checks in the guest what was typed and pasted.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { launch } from './browser.mjs';

const url = process.env.QUETZAL_URL;
const token = process.env.QUETZAL_TOKEN;
const vm = process.env.QUETZAL_VM;
const shots = process.env.SCREENSHOTS;
assert.ok(url && token && vm && shots, 'QUETZAL_URL, QUETZAL_TOKEN, QUETZAL_VM and SCREENSHOTS are set');
mkdirSync(shots, { recursive: true });

// Sizes a CVT mode has exactly (widths a multiple of 8).
const first = { width: 1104, height: 704 };
const second = { width: 1024, height: 640 };

// Types `text` key by key as a US keyboard makes it, Shift pressed for
// the characters that need it: QEMU gets scancodes, so the guest's
// layout (US) reads them (playwright's `type` sends `>` without Shift).
const SHIFTED = {
  '>': 'Period',
  _: 'Minus',
  '|': 'Backslash',
  $: 'Digit4',
  '(': 'Digit9',
  ')': 'Digit0',
  '*': 'Digit8',
};
async function typeKeys(page, text) {
  for (const ch of text) {
    if (SHIFTED[ch]) await page.keyboard.press(`Shift+${SHIFTED[ch]}`);
    else if (/[A-Z]/.test(ch)) await page.keyboard.press(`Shift+Key${ch}`);
    else await page.keyboard.type(ch);
  }
}

// Polls `check` (run in the page, awaited) until it is true.
async function until(page, what, check, arg, timeout = 60_000) {
  const deadline = Date.now() + timeout;
  while (!(await page.evaluate(check, arg))) {
    assert.ok(Date.now() < deadline, `${what}: not within ${timeout / 1000} s`);
    await page.waitForTimeout(500);
  }
}

// Whether a command exits 0 in the guest, asked from the page (its
// session) through the API's exec.
const guest = ([command, ...args]) => ({ path: `/api/v1/vms/${encodeURIComponent(vm)}/exec`, command, args });
const inGuest = ({ path, command, args }) =>
  fetch(path, {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ command, args }),
  })
    .then((r) => r.json())
    .then((done) => done.exit_code === 0);

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: first });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: url });
  const page = await context.newPage();
  await page.goto(url);
  await page.getByLabel('API token').fill(token);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('heading', { name: 'Overview' }).waitFor();
  await page.goto(`${url}/#/desktop/${vm}`);
  const canvas = page.getByTestId('desktop').locator('canvas');
  await canvas.waitFor();
  await page.getByRole('status').waitFor({ state: 'detached' });

  // The guest's framebuffer (the canvas's own size, not its scaled CSS
  // size) becomes the window's.
  const framebuffer = () =>
    page.evaluate(() => {
      const c = document.querySelector('[data-testid="desktop"] canvas');
      return { width: c.width, height: c.height };
    });
  const becomes = async (size) => {
    const deadline = Date.now() + 90_000;
    let seen = await framebuffer();
    while ((seen.width !== size.width || seen.height !== size.height) && Date.now() < deadline) {
      await page.waitForTimeout(250);
      seen = await framebuffer();
    }
    assert.deepEqual(seen, size, `the guest's screen is ${seen.width}x${seen.height}, the window ${size.width}x${size.height}`);
  };
  await becomes(first);
  console.log(`desktop-page: the guest's screen took the window's ${first.width}x${first.height}`);
  await page.setViewportSize(second);
  await becomes(second);
  await page.screenshot({ path: `${shots}/desktop-page.png` });
  console.log(`desktop-page: and followed it to ${second.width}x${second.height}`);

  // Into the maximized terminal: a file named with shifted keys.
  await canvas.click();
  await typeKeys(page, 'touch /tmp/Typed_in_browser');
  await page.keyboard.press('Enter');
  console.log('desktop-page: typed a command into the terminal');

  // The browser's clipboard pasted in the guest, into `cat`: the paste
  // key waits until the guest's clipboard has the text, the terminal then
  // asks for it, and cat writes the line once it is whole. The page
  // waits for the guest to have it (a paste lands after keys typed at
  // once behind it, as in any X terminal), then ends cat.
  await page.evaluate(() => navigator.clipboard.writeText('pasted-from-browser\n'));
  await typeKeys(page, 'cat >/tmp/pasted');
  await page.keyboard.press('Enter');
  await page.keyboard.press('Control+Shift+KeyV');
  await until(page, 'the pasted line in /tmp/pasted', inGuest, guest(['grep', '-qx', 'pasted-from-browser', '/tmp/pasted']));
  await page.keyboard.press('Control+KeyD');
  console.log('desktop-page: pasted the browser clipboard into the terminal');

  // Text copied in the guest's terminal (Select All, then Copy) reaches
  // the browser's clipboard after the copy key. The command's output is
  // in the terminal first: the page waits for the file it tees to.
  await typeKeys(page, 'echo copied-$((6*7)) | tee /tmp/echoed');
  await page.keyboard.press('Enter');
  await until(page, 'the echoed line', inGuest, guest(['grep', '-qx', 'copied-42', '/tmp/echoed']));
  const copies = Number(await page.locator('.desktop-page').getAttribute('data-copies'));
  await page.keyboard.press('Control+Shift+KeyA');
  await page.keyboard.press('Control+Shift+KeyC');
  await until(
    page,
    "the terminal's text in the browser's clipboard",
    (n) => Number(document.querySelector('.desktop-page').dataset.copies) > n,
    copies,
    30_000,
  );
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  assert.ok(copied.split('\n').includes('copied-42'), `the browser's clipboard has ${JSON.stringify(copied)}`);
  console.log("desktop-page: the guest's copy reached the browser's clipboard");
  console.log('desktop-page: all passed');
} finally {
  await browser.close();
}

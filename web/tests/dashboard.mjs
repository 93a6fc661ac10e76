// The dashboard in a real browser (Debian's Chromium, driven by
// playwright-core) against a real quetzald with real VMs. Run by
// crates/cli/tests/dashboard.rs, which starts the daemon and passes
// QUETZAL_URL, QUETZAL_TOKEN and SCREENSHOTS.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { launch } from './browser.mjs';

const url = process.env.QUETZAL_URL;
const token = process.env.QUETZAL_TOKEN;
const shots = process.env.SCREENSHOTS;
assert.ok(url && token && shots, 'QUETZAL_URL, QUETZAL_TOKEN and SCREENSHOTS are set');
mkdirSync(shots, { recursive: true });

const BOOT = 120_000;

function step(name) {
  console.log(`dashboard: ${name}`);
}

async function shot(page, name) {
  await page.screenshot({ path: `${shots}/${name}.png` });
}

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (err) => problems.push(err.message));

  step('the API refuses a request without the token');
  const anonymous = await fetch(`${url}/api/v1/vms`);
  assert.equal(anonymous.status, 401);
  assert.equal((await anonymous.json()).error.code, 'unauthorized');

  step('a wrong token is refused');
  await page.goto(url);
  await page.getByLabel('API token').fill('not-the-token');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByText('That token is not right').waitFor();
  await shot(page, 'login');

  step('log in with the token: the session lives in an HttpOnly, Secure, SameSite=Strict cookie');
  await page.getByLabel('API token').fill(token);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('heading', { name: 'Overview' }).waitFor();
  const [cookie] = await context.cookies();
  assert.equal(cookie.name, 'quetzal_session');
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.secure, true);
  assert.equal(cookie.sameSite, 'Strict');
  assert.match(await page.getByTestId('accel').innerText(), /^(kvm|tcg)$/);
  await shot(page, 'overview');

  step('create a VM from the form; it reaches running without a reload');
  await page.getByRole('link', { name: 'Virtual machines' }).click();
  await page.getByRole('link', { name: 'Create VM' }).click();
  await page.getByLabel('Name').fill('bad name!');
  await page.getByRole('button', { name: 'Create' }).click();
  // The API's own validation message, shown as is.
  await page.getByRole('alert').getByText(/name/i).waitFor();
  await shot(page, 'create-vm');
  await page.getByLabel('Name').fill('pw1');
  await page.getByRole('button', { name: 'Create' }).click();
  await page.waitForURL(/#\/vms\/pw1$/);
  await page.locator('h1 [data-state="running"]').waitFor({ timeout: 30_000 });

  step('type into the serial console and see the output');
  await page.getByRole('tab', { name: 'Serial console' }).click();
  const serial = page.getByTestId('serial');
  await serial.locator('.xterm-rows').getByText('tiny:/#').first().waitFor({ timeout: BOOT });
  await serial.click();
  await page.keyboard.type('echo serial-$((6*7))\n');
  await serial.locator('.xterm-rows').getByText('serial-42').waitFor();
  await shot(page, 'serial-console');

  step('the summary shows the guest agent, and a command runs in the guest');
  await page.getByRole('tab', { name: 'Summary' }).click();
  await page.getByTestId('agent').getByText(/^quetzal-agent /).waitFor({ timeout: BOOT });
  await page.getByLabel('Run in the guest').fill('echo agent-$((6*7)); exit 3');
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  const ran = page.getByTestId('command-result');
  await ran.getByText('agent-42').waitFor();
  await ran.getByText('exit 3').waitFor();
  await shot(page, 'run-command');

  step('the graphical console shows the screen, and typing changes it');
  await page.getByRole('tab', { name: 'Screen' }).click();
  await page.getByText('Screen · connected').waitFor();
  const canvas = page.getByTestId('screen').locator('canvas');
  await canvas.waitFor();
  await page.waitForTimeout(1500);
  // The screen's own pixels, compared in the page: a blinking cursor
  // changes a few dozen, a typed line and its output well over a thousand.
  await page.evaluate(() => {
    const c = document.querySelector('[data-testid="screen"] canvas');
    window.screenBefore = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  });
  const changedPixels = () =>
    page.evaluate(() => {
      const c = document.querySelector('[data-testid="screen"] canvas');
      const now = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let changed = 0;
      for (let i = 0; i < now.length; i += 4) {
        if (now[i] !== window.screenBefore[i] || now[i + 1] !== window.screenBefore[i + 1] || now[i + 2] !== window.screenBefore[i + 2]) changed += 1;
      }
      return changed;
    });
  await page.waitForTimeout(1500);
  const idle = await changedPixels();
  assert.ok(idle < 500, `the screen changed by ${idle} pixels with nobody typing`);
  await canvas.click();
  await page.keyboard.type('echo screen-changed\n');
  const deadline = Date.now() + 20_000;
  let typed = 0;
  while (typed < 500 && Date.now() < deadline) {
    await page.waitForTimeout(250);
    typed = await changedPixels();
  }
  assert.ok(typed >= 500, `typing changed only ${typed} pixels of the screen (idle: ${idle})`);
  console.log(`dashboard: screen pixels changed idle ${idle}, after typing ${typed}`);
  await page.waitForTimeout(1500);
  await shot(page, 'graphical-console');

  step('take a snapshot and revert to it');
  await page.getByRole('tab', { name: 'Snapshots' }).click();
  await page.getByLabel('Snapshot name').fill('s1');
  await page.getByRole('button', { name: 'Take snapshot' }).click();
  // The snapshot runs as an operation, shown in the sidebar as it ends.
  await page.locator('[data-testid="operations"] [data-state="succeeded"]').waitFor({ timeout: 60_000 });
  await page.locator('[data-snapshot="s1"]').waitFor({ timeout: 60_000 });
  await page.getByRole('button', { name: 'Revert to s1' }).click();
  await page.waitForFunction(
    async () => {
      const r = await fetch('/api/v1/events?vm=pw1&limit=1000');
      const page = await r.json();
      return page.events.some((e) => /revert/.test(e.kind));
    },
    null,
    { timeout: 60_000, polling: 500 },
  );
  await page.locator('[data-snapshot="s1"]').getByText('current').waitFor();
  await shot(page, 'snapshots');

  step('the summary shows live charts');
  await page.getByRole('tab', { name: 'Summary' }).click();
  await page.locator('.chart canvas').first().waitFor();
  await page.waitForTimeout(4500);
  await shot(page, 'vm-detail');

  step('other pages render');
  for (const [name, heading] of [
    ['templates', 'Templates'],
    ['networks', 'Networks'],
    ['events', 'Events'],
  ]) {
    await page.goto(`${url}/#/${name}`);
    await page.getByRole('heading', { name: heading, exact: true }).waitFor();
    await shot(page, name);
  }
  await page.goto(`${url}/#/vms`);
  await page.locator('[data-vm="pw1"]').waitFor();
  await shot(page, 'vms');
  await page.setViewportSize({ width: 768, height: 1024 });
  await shot(page, 'vms-tablet');
  await page.setViewportSize({ width: 1280, height: 800 });

  step('stop it with the bulk action, then delete it with confirmation');
  const row = page.locator('[data-vm="pw1"]');
  await row.getByLabel('Select pw1').check();
  await page.getByRole('button', { name: 'Stop selected' }).click();
  await row.locator('[data-state="stopped"]').waitFor({ timeout: 60_000 });
  await row.getByRole('button', { name: 'Delete pw1' }).click();
  const dialog = page.getByRole('dialog');
  await dialog.getByText('Delete pw1?').waitFor();
  await dialog.getByRole('button', { name: 'Delete' }).click();
  await row.waitFor({ state: 'detached' });
  const gone = await page.evaluate(async () => (await fetch('/api/v1/vms/pw1')).status);
  assert.equal(gone, 404);

  step('the audit page lists what was done, by whom, and new changes arrive live');
  await page.getByRole('link', { name: 'Audit' }).click();
  await page.getByRole('heading', { name: 'Audit log' }).waitFor();
  const deleted = page.getByTestId('audit-row').filter({ hasText: 'DELETE /api/v1/vms/pw1' });
  await deleted.first().waitFor();
  assert.match(await deleted.first().innerText(), /admin/);
  await page.evaluate(async () => fetch('/api/v1/vms/pw1/start', { method: 'POST' }));
  await page.getByTestId('audit-row').filter({ hasText: 'POST /api/v1/vms/pw1/start' }).first().waitFor();
  await shot(page, 'audit');

  step('log out: the API refuses the old session');
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByLabel('API token').waitFor();
  const after = await page.evaluate(async () => (await fetch('/api/v1/vms')).status);
  assert.equal(after, 401);

  step('the login link `quetzal up` prints logs in too');
  await page.goto(`${url}/#token=${token}`);
  await page.getByRole('heading', { name: 'Overview' }).waitFor();
  assert.ok(!page.url().includes(token), 'the token stays out of the address bar');

  assert.deepEqual(problems, [], 'no script errors in the page');
  step('all passed');
} finally {
  await browser.close();
}

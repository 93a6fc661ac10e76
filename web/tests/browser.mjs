// The browser the dashboard's test and benchmark drive: Debian's Chromium
// (installed by scripts/setup), headless, through playwright-core.

import { createHash, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

// quetzald's node certificate is its own (self-signed): the browser trusts
// exactly its public key (QUETZAL_CERT, a PEM file), as a pinned client
// would, and nothing else.
function pinnedKey() {
  const pem = readFileSync(process.env.QUETZAL_CERT);
  const spki = new X509Certificate(pem).publicKey.export({ type: 'spki', format: 'der' });
  return createHash('sha256').update(spki).digest('base64');
}

// Chromium aborts a navigation in flight with ERR_NETWORK_CHANGED when
// the host's interfaces change, and the suite's other tests make and
// remove bridges and TAP devices all the time: a page load that met one
// is tried again (up to 5 times), as a user would reload. Pages share
// one prototype: patched once, it serves every page of every browser.
let patched = false;
async function retryNavigations(browser) {
  if (patched) return;
  const context = await browser.newContext();
  const proto = Object.getPrototypeOf(await context.newPage());
  await context.close();
  const goto = proto.goto;
  proto.goto = async function retried(url, options) {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await goto.call(this, url, options);
      } catch (err) {
        if (attempt >= 5 || !String(err?.message).includes('ERR_NETWORK_CHANGED')) throw err;
      }
    }
  };
  patched = true;
}

export async function launch() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    // Tests run as root, where Chromium's sandbox cannot start.
    args: ['--no-sandbox', `--ignore-certificate-errors-spki-list=${pinnedKey()}`],
  });
  await retryNavigations(browser);
  return browser;
}

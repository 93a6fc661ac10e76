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

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    // Tests run as root, where Chromium's sandbox cannot start.
    args: ['--no-sandbox', `--ignore-certificate-errors-spki-list=${pinnedKey()}`],
  });
}

// The browser the dashboard's test and benchmark drive: Debian's Chromium
// (installed by scripts/setup), headless, through playwright-core.

import { chromium } from 'playwright-core';

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    // Tests run as root, where Chromium's sandbox cannot start.
    args: ['--no-sandbox'],
  });
}

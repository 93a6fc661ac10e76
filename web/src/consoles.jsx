// The consoles: the serial console in xterm.js, the screen in noVNC, both
// over the daemon's authenticated WebSockets.

import { useEffect, useRef, useState } from 'preact/hooks';
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';
import RFB from '@novnc/novnc';
import { api, enc, wsUrl } from './api.js';

/** Asks QEMU for Tight with JPEG (it serves it with `lossy=on`). */
function encodings(client) {
  client.qualityLevel = 6;
  client.compressionLevel = 2;
}

/** X keysyms of the keys that are not characters. */
const NAMED_KEYSYMS = {
  Backspace: 0xff08,
  Tab: 0xff09,
  Enter: 0xff0d,
  Escape: 0xff1b,
  Delete: 0xffff,
  Insert: 0xff63,
  Home: 0xff50,
  End: 0xff57,
  ArrowLeft: 0xff51,
  ArrowUp: 0xff52,
  ArrowRight: 0xff53,
  ArrowDown: 0xff54,
  ShiftLeft: 0xffe1,
  ShiftRight: 0xffe2,
  ControlLeft: 0xffe3,
  ControlRight: 0xffe4,
  AltLeft: 0xffe9,
  AltRight: 0xfe03,
  MetaLeft: 0xffeb,
  MetaRight: 0xffec,
};

/**
 * The keysym of a key event noVNC did not see: QEMU goes by the scancode
 * (`code`), the keysym only has to be sane. Null for what has neither.
 */
function keysymOf(e) {
  const named = NAMED_KEYSYMS[e.code] ?? NAMED_KEYSYMS[e.key];
  if (named !== undefined) return named;
  if ([...e.key].length !== 1) return null;
  const point = e.key.codePointAt(0);
  return point < 0x100 ? point : 0x1000000 + point;
}

/**
 * Keeps the guest desktop's clipboard and the browser's in step, through
 * the API (the guest's agent runs its `quetzal-clipboard`; QEMU 7.2's own
 * VNC clipboard needs its vdagent chardev, which blocks migration, so
 * warm templates and memory snapshots). Into the guest: when the page
 * gets focus, and just before a paste key (Ctrl+V, Ctrl+Shift+V,
 * Shift+Insert) reaches it. Out of it: just after a copy key (Ctrl+C,
 * Ctrl+X, Ctrl+Shift+C, Ctrl+Insert). Without the browser's clipboard
 * permission, or in a guest without a desktop clipboard, it does nothing
 * and the screen works the same. `pasted` is called when a held paste
 * key went on, `copied` when the guest's text reached the browser's
 * clipboard. Returns a function that stops it.
 */
function shareClipboard(client, vm, box, { pasted = () => {}, copied = () => {} } = {}) {
  const path = `/vms/${enc(vm)}/clipboard`;
  // The text both sides last had: nothing is sent twice.
  let last = null;
  const toGuest = async () => {
    let text;
    try {
      text = await navigator.clipboard.readText();
    } catch {
      return; // No permission, or the page lost focus.
    }
    if (text === last || text === '') return;
    try {
      await api('PUT', path, { text });
      last = text;
    } catch {
      // Not running, or no desktop clipboard in it.
    }
  };
  const fromGuest = async () => {
    let text;
    try {
      ({ text } = await api('GET', path));
    } catch {
      return;
    }
    if (text === last || text === '') return;
    try {
      await navigator.clipboard.writeText(text);
      last = text;
      copied();
    } catch {
      // No permission.
    }
  };
  const isPaste = (e) => (e.ctrlKey && e.code === 'KeyV') || (e.shiftKey && e.code === 'Insert');
  const isCopy = (e) => e.ctrlKey && (e.code === 'KeyC' || e.code === 'KeyX' || e.code === 'Insert');
  // A paste key waits for the guest's clipboard to be set, and the keys
  // after it wait with it, in order: the modifiers held with it are still
  // down in the guest when it goes on.
  let held = null;
  let queue = null;
  const queued = (e, down) => {
    const keysym = keysymOf(e);
    if (keysym !== null) queue.push([keysym, e.code, down]);
  };
  const down = (e) => {
    if (queue) {
      e.stopPropagation();
      e.preventDefault();
      queued(e, true);
      return;
    }
    if (!isPaste(e)) return;
    e.stopPropagation();
    e.preventDefault();
    held = e.code;
    queue = [];
    const keysym = e.code === 'Insert' ? 0xff63 : e.shiftKey ? 0x56 : 0x76;
    toGuest().finally(() => {
      client.sendKey(keysym, held, true);
      client.sendKey(keysym, held, false);
      for (const [sym, code, isDown] of queue) client.sendKey(sym, code, isDown);
      queue = null;
      held = null;
      pasted();
    });
  };
  // The guest takes a moment to own what was copied; a slow one longer.
  const timers = new Set();
  const later = (ms) => {
    const timer = setTimeout(() => {
      timers.delete(timer);
      fromGuest();
    }, ms);
    timers.add(timer);
  };
  const up = (e) => {
    if (queue) {
      e.stopPropagation();
      e.preventDefault();
      // The paste key's own release goes with its press.
      if (e.code !== held) queued(e, false);
      return;
    }
    if (isCopy(e)) {
      later(300);
      later(1500);
    }
  };
  box.addEventListener('keydown', down, true);
  box.addEventListener('keyup', up, true);
  window.addEventListener('focus', toGuest);
  return () => {
    box.removeEventListener('keydown', down, true);
    box.removeEventListener('keyup', up, true);
    window.removeEventListener('focus', toGuest);
    for (const timer of timers) clearTimeout(timer);
  };
}

export function SerialConsole({ vm }) {
  const box = useRef(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    const term = new Terminal({
      cursorBlink: true,
      scrollback: 5000,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
      fontSize: 14,
      theme: { background: '#0f1419' },
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(box.current);
    fit.fit();
    const socket = new WebSocket(wsUrl(`/vms/${enc(vm)}/console`));
    socket.binaryType = 'arraybuffer';
    socket.onopen = () => setStatus('connected');
    socket.onclose = () => setStatus('closed');
    socket.onmessage = (m) => term.write(typeof m.data === 'string' ? m.data : new Uint8Array(m.data));
    const encoder = new TextEncoder();
    const input = term.onData((data) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
    });
    const resize = () => fit.fit();
    window.addEventListener('resize', resize);
    term.focus();
    return () => {
      window.removeEventListener('resize', resize);
      input.dispose();
      socket.close();
      term.dispose();
    };
  }, [vm]);
  return (
    <div class="console">
      <div class="console-bar">
        <span class={`dot ${status}`} /> Serial console · {status}
        {status === 'closed' ? <span class="muted"> — the VM is not running, or it stopped</span> : null}
      </div>
      <div class="terminal" ref={box} data-testid="serial" />
    </div>
  );
}

export function GraphicalConsole({ vm }) {
  const box = useRef(null);
  const rfb = useRef(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    const client = new RFB(box.current, wsUrl(`/vms/${enc(vm)}/vnc`), { wsProtocols: ['binary'] });
    client.scaleViewport = true;
    client.focusOnClick = true;
    encodings(client);
    client.addEventListener('connect', () => setStatus('connected'));
    client.addEventListener('disconnect', () => setStatus('closed'));
    rfb.current = client;
    const unshare = shareClipboard(client, vm, box.current);
    return () => {
      unshare();
      try {
        client.disconnect();
      } catch {
        // Already gone.
      }
    };
  }, [vm]);
  const screenshot = () => {
    const url = rfb.current?.toDataURL('image/png');
    if (!url) return;
    const link = document.createElement('a');
    link.href = url;
    link.download = `${vm}-${Date.now()}.png`;
    link.click();
  };
  return (
    <div class="console">
      <div class="console-bar">
        <span class={`dot ${status}`} /> Screen · {status}
        <span class="grow" />
        <button type="button" class="btn small" onClick={() => rfb.current?.sendCtrlAltDel()} disabled={status !== 'connected'}>
          Ctrl-Alt-Del
        </button>
        <button type="button" class="btn small" onClick={screenshot} disabled={status !== 'connected'}>
          Screenshot
        </button>
      </div>
      <div class="screen" ref={box} data-testid="screen" />
    </div>
  );
}

/**
 * A desktop on the whole browser window and nothing else: the screen is
 * scaled to the window, and asks the guest to take the window's size
 * (noVNC's `resizeSession` sends SetDesktopSize; QEMU passes it to the
 * virtio GPU, and the desktop image's session follows it).
 */
export function DesktopScreen({ vm }) {
  const box = useRef(null);
  const [status, setStatus] = useState('connecting');
  // Clipboard round trips done, for whoever needs to know (a test).
  const [pastes, setPastes] = useState(0);
  const [copies, setCopies] = useState(0);
  useEffect(() => {
    document.title = `${vm} · Quetzal`;
    const client = new RFB(box.current, wsUrl(`/vms/${enc(vm)}/vnc`), { wsProtocols: ['binary'] });
    client.scaleViewport = true;
    client.resizeSession = true;
    client.focusOnClick = true;
    encodings(client);
    client.addEventListener('connect', () => {
      setStatus('connected');
      client.focus();
    });
    client.addEventListener('disconnect', () => setStatus('closed'));
    const unshare = shareClipboard(client, vm, box.current, {
      pasted: () => setPastes((n) => n + 1),
      copied: () => setCopies((n) => n + 1),
    });
    return () => {
      unshare();
      try {
        client.disconnect();
      } catch {
        // Already gone.
      }
    };
  }, [vm]);
  return (
    <div class="desktop-page" data-pastes={pastes} data-copies={copies}>
      <div class="desktop-screen" ref={box} data-testid="desktop" />
      {status !== 'connected' ? (
        <div class="desktop-status" role="status">
          {status === 'connecting' ? `Connecting to ${vm}…` : `${vm} is not running, or it stopped.`}
        </div>
      ) : null}
    </div>
  );
}

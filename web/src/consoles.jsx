// The consoles: the serial console in xterm.js, the screen in noVNC, both
// over the daemon's authenticated WebSockets.

import { useEffect, useRef, useState } from 'preact/hooks';
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';
import RFB from '@novnc/novnc';
import { enc, wsUrl } from './api.js';

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
    client.addEventListener('connect', () => setStatus('connected'));
    client.addEventListener('disconnect', () => setStatus('closed'));
    rfb.current = client;
    return () => {
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
 * (noVNC's `resizeSession`: QEMU passes it on to display devices that
 * can change mode).
 */
export function DesktopScreen({ vm }) {
  const box = useRef(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    document.title = `${vm} · Quetzal`;
    const client = new RFB(box.current, wsUrl(`/vms/${enc(vm)}/vnc`), { wsProtocols: ['binary'] });
    client.scaleViewport = true;
    client.resizeSession = true;
    client.focusOnClick = true;
    client.addEventListener('connect', () => {
      setStatus('connected');
      client.focus();
    });
    client.addEventListener('disconnect', () => setStatus('closed'));
    return () => {
      try {
        client.disconnect();
      } catch {
        // Already gone.
      }
    };
  }, [vm]);
  return (
    <div class="desktop-page">
      <div class="desktop-screen" ref={box} data-testid="desktop" />
      {status !== 'connected' ? (
        <div class="desktop-status" role="status">
          {status === 'connecting' ? `Connecting to ${vm}…` : `${vm} is not running, or it stopped.`}
        </div>
      ) : null}
    </div>
  );
}

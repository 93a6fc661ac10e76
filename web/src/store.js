// Live state shared by the pages: VMs, host, recent events — loaded once,
// then kept current from the daemon's event stream, so pages never reload.

import { signal } from '@preact/signals';
import { enc, get, subscribe } from './api.js';

export const vms = signal(null); // Map name -> Vm, or null while loading
export const host = signal(null);
export const recentEvents = signal([]);
export const stats = signal(new Map()); // name -> { cpu, rss, at } for running VMs
export const operations = signal(new Map()); // id -> Operation, running or just ended

const listeners = new Set();
const poolListeners = new Set();

/** Also tell `handler` the name of each desktop pool that changed. */
export function onPool(handler) {
  poolListeners.add(handler);
  return () => poolListeners.delete(handler);
}

/** Also tell `handler` about each event (pages showing one VM). */
export function onEvent(handler) {
  listeners.add(handler);
  return () => listeners.delete(handler);
}

let closeStream = null;
let statsTimer = null;

export async function start() {
  stop();
  const [list, hostInfo, page, ops] = await Promise.all([
    get('/vms'),
    get('/host'),
    get(`/events?before=${Number.MAX_SAFE_INTEGER}&limit=50`),
    get('/operations'),
  ]);
  operations.value = new Map(ops.operations.filter((op) => op.state === 'running').map((op) => [op.id, op]));
  vms.value = new Map(list.map((vm) => [vm.name, vm]));
  host.value = hostInfo;
  recentEvents.value = page.events.reverse();
  closeStream = subscribe(handle, handleOperation, (pool) => {
    for (const listener of poolListeners) listener(pool);
  });
  pollStats();
  statsTimer = setInterval(pollStats, 3000);
}

export function stop() {
  closeStream?.();
  closeStream = null;
  clearInterval(statsTimer);
}

async function handle(event) {
  recentEvents.value = [event, ...recentEvents.value].slice(0, 50);
  for (const listener of listeners) listener(event);
  if (event.kind === 'deleted' || event.kind === 'templated') {
    const next = new Map(vms.value);
    next.delete(event.vm);
    vms.value = next;
  } else {
    await refreshVm(event.vm);
  }
  host.value = host.value && { ...host.value, vms_by_state: countStates() };
}

/** Keeps running operations (and, for a few seconds, how they ended). */
function handleOperation(op) {
  operations.value = new Map(operations.value).set(op.id, op);
  if (op.state !== 'running') {
    setTimeout(() => {
      const next = new Map(operations.value);
      next.delete(op.id);
      operations.value = next;
    }, 4000);
  }
}

/** Re-reads one VM (after an event or an action). */
export async function refreshVm(name) {
  try {
    const vm = await get(`/vms/${enc(name)}`);
    vms.value = new Map(vms.value).set(vm.name, vm);
  } catch {
    // Gone meanwhile: its `deleted` event will follow.
  }
}

function countStates() {
  const counts = {};
  for (const vm of vms.value?.values() ?? []) counts[vm.state] = (counts[vm.state] ?? 0) + 1;
  return counts;
}

// CPU use needs two readings: keep the previous one per VM.
const previous = new Map();

async function pollStats() {
  const running = [...(vms.value?.values() ?? [])].filter((vm) => vm.state === 'running');
  const next = new Map();
  await Promise.all(
    running.map(async (vm) => {
      try {
        const s = await get(`/vms/${enc(vm.name)}/stats`);
        const before = previous.get(vm.name);
        const cpu = before ? ((s.cpu_seconds - before.cpu_seconds) * 1000) / (s.at - before.at) : null;
        previous.set(vm.name, s);
        next.set(vm.name, { cpu, rss: s.resident_bytes });
      } catch {
        previous.delete(vm.name);
      }
    }),
  );
  stats.value = next;
}

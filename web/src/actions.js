// What a user can do to a VM in each state, and doing it.

import { del, enc, post } from './api.js';
import { refreshVm } from './store.js';

export const ACTIONS = {
  start: { label: 'Start', states: ['stopped', 'crashed'] },
  stop: { label: 'Stop', states: ['running', 'paused'] },
  'force-stop': { label: 'Force stop', states: ['running', 'paused', 'stopping'], kind: 'danger' },
  restart: { label: 'Restart', states: ['running'] },
  pause: { label: 'Pause', states: ['running'] },
  resume: { label: 'Resume', states: ['paused'] },
};

export function allowed(vm, action) {
  return ACTIONS[action].states.includes(vm.state);
}

export async function act(name, action) {
  await post(`/vms/${enc(name)}/${action}`);
  await refreshVm(name);
}

export async function remove(name) {
  await del(`/vms/${enc(name)}`);
}

export async function snapshot(name, snap) {
  return post(`/vms/${enc(name)}/snapshots`, { name: snap });
}

/** Clones a stopped VM; resolves when the copy is done. */
export async function clone(name, newName) {
  await post(`/vms/${enc(name)}/clone`, { name: newName });
  await refreshVm(newName);
}

/** A name for a snapshot taken now: `snap-20261122-0715`. */
export function snapshotName() {
  const d = new Date();
  const pad = (n) => String(n).padStart(2, '0');
  return `snap-${d.getFullYear()}${pad(d.getMonth() + 1)}${pad(d.getDate())}-${pad(d.getHours())}${pad(d.getMinutes())}${pad(d.getSeconds())}`;
}

import { useEffect, useState } from 'preact/hooks';
import { del, enc, get, post } from '../api.js';
import { onEvent, vms } from '../store.js';
import { ACTIONS, act, allowed, clone, remove, snapshotName } from '../actions.js';
import { bytes, duration, mib, time } from '../format.js';
import { Chart, POINTS, toSeries } from '../charts.jsx';
import { GraphicalConsole, SerialConsole } from '../consoles.jsx';
import { ActionButton, Confirm, Empty, ErrorNote, Loading, StateBadge } from '../ui.jsx';
import { Events } from './Events.jsx';

const TABS = [
  ['summary', 'Summary'],
  ['serial', 'Serial console'],
  ['screen', 'Screen'],
  ['snapshots', 'Snapshots'],
  ['events', 'Events'],
];

export function VmDetail({ name, query }) {
  const vm = vms.value?.get(name);
  const tab = query.get('tab') ?? 'summary';
  const [error, setError] = useState(null);
  const [confirm, setConfirm] = useState(null);
  if (!vms.value) return <Loading />;
  if (!vm) return <Empty title={`No VM named ${name}`}>It may have been deleted. <a href="#/vms">All VMs</a></Empty>;

  const running = vm.state === 'running' || vm.state === 'paused';
  return (
    <section>
      <header class="page-head">
        <div>
          <a href="#/vms" class="muted small">
            ← Virtual machines
          </a>
          <h1>
            {vm.name} <StateBadge state={vm.state} />
          </h1>
        </div>
        <div class="row wrap">
          {Object.entries(ACTIONS)
            .filter(([action]) => allowed(vm, action))
            .map(([action, { label, kind }]) => (
              <ActionButton key={action} kind={kind ?? ''} action={() => act(vm.name, action)} onError={setError}>
                {label}
              </ActionButton>
            ))}
          <ActionButton
            action={() => post(`/vms/${enc(vm.name)}/snapshots`, { name: snapshotName() })}
            onError={setError}
          >
            Snapshot
          </ActionButton>
          {!running ? (
            <ActionButton
              action={async () => {
                const newName = prompt('Name of the clone', `${vm.name}-clone`);
                if (newName) {
                  await clone(vm.name, newName);
                  location.hash = `#/vms/${enc(newName)}`;
                }
              }}
              onError={setError}
            >
              Clone
            </ActionButton>
          ) : null}
          {!running ? (
            <button type="button" class="btn danger" onClick={() => setConfirm('delete')}>
              Delete
            </button>
          ) : null}
        </div>
      </header>
      <ErrorNote message={error} onClose={() => setError(null)} />
      <nav class="tabs" role="tablist">
        {TABS.map(([key, label]) => (
          <a
            key={key}
            role="tab"
            aria-selected={tab === key}
            class={tab === key ? 'active' : ''}
            href={`#/vms/${enc(vm.name)}?tab=${key}`}
          >
            {label}
          </a>
        ))}
      </nav>
      {tab === 'summary' ? <Summary vm={vm} /> : null}
      {tab === 'serial' ? running ? <SerialConsole vm={vm.name} /> : <NotRunning /> : null}
      {tab === 'screen' ? running ? <GraphicalConsole vm={vm.name} /> : <NotRunning /> : null}
      {tab === 'snapshots' ? <Snapshots vm={vm} onError={setError} /> : null}
      {tab === 'events' ? <Events vm={vm.name} /> : null}
      {confirm === 'delete' ? (
        <Confirm
          title={`Delete ${vm.name}?`}
          body="Its disks and snapshots are deleted too. This cannot be undone."
          confirmLabel="Delete"
          onCancel={() => setConfirm(null)}
          onConfirm={async () => {
            setConfirm(null);
            try {
              await remove(vm.name);
              location.hash = '#/vms';
            } catch (err) {
              setError(err.message);
            }
          }}
        />
      ) : null}
    </section>
  );
}

const rate = (v) => `${bytes(v)}/s`;

/** How the VM's process holds host memory (its latest stats reading). */
function hostMemoryText(m) {
  if (!m) return '–';
  const template = m.template_shared_bytes != null ? ` (${bytes(m.template_shared_bytes)} its template's)` : '';
  return `PSS ${bytes(m.pss_bytes)}: ${bytes(m.private_bytes)} private, ${bytes(m.shared_bytes)} shared${template}, ${bytes(m.ksm_merged_bytes)} merged by KSM`;
}

function NotRunning() {
  return <Empty title="The VM is not running">Start it to use its consoles.</Empty>;
}

function Summary({ vm }) {
  const [readings, setReadings] = useState([]);
  useEffect(() => {
    if (vm.state !== 'running') return undefined;
    let stopped = false;
    const poll = async () => {
      try {
        const s = await get(`/vms/${enc(vm.name)}/stats`);
        if (!stopped) setReadings((r) => [...r.slice(-POINTS), s]);
      } catch {
        // Stopped meanwhile.
      }
    };
    poll();
    const timer = setInterval(poll, 2000);
    return () => {
      stopped = true;
      clearInterval(timer);
    };
  }, [vm.name, vm.state]);
  const s = toSeries(readings);
  const labels = Object.entries(vm.labels).map(([k, v]) => `${k}=${v}`);
  return (
    <div class="detail">
      <div class="card">
        <dl class="facts">
          <dt>Image</dt>
          <dd>{vm.image}{vm.linked_to ? ` · linked clone of template ${vm.linked_to}` : ''}</dd>
          <dt>vCPUs · memory · disk</dt>
          <dd>
            {vm.cpus} · {mib(vm.memory_mib)} · {mib(vm.disk_mib)}
          </dd>
          <dt>Network</dt>
          <dd>
            {vm.network} · <span class="mono">{vm.mac}</span>
          </dd>
          <dt>Addresses</dt>
          <dd class="mono" data-testid="addresses">{vm.addresses.join(', ') || '–'}</dd>
          <dt>Uptime</dt>
          <dd>{vm.started_at ? duration(Date.now() - vm.started_at) : '–'}</dd>
          <dt>Restart policy</dt>
          <dd>
            {vm.restart_policy}
            {vm.restarts ? ` · ${vm.restarts} automatic restarts` : ''}
          </dd>
          <dt>Labels</dt>
          <dd>{labels.join(', ') || '–'}</dd>
          <dt>Created</dt>
          <dd>{time(vm.created_at)}</dd>
          <dt>Guest agent</dt>
          <dd data-testid="agent">{agentText(vm.agent)}</dd>
          <dt>Guest memory</dt>
          <dd data-testid="guest-memory">
            {vm.guest_memory
              ? `${bytes(vm.guest_memory.used_bytes)} used of ${bytes(vm.guest_memory.total_bytes)} (${mib(vm.memory_mib)} allocated; from its ${vm.guest_memory.source})`
              : '–'}
          </dd>
          <dt>Host memory</dt>
          <dd data-testid="host-memory">{hostMemoryText(readings.at(-1)?.memory)}</dd>
          <dt>Guest disks</dt>
          <dd data-testid="guest-disks">
            {(vm.agent?.filesystems ?? []).map((fs) => `${fs.mountpoint} ${bytes(fs.used_bytes)} of ${bytes(fs.total_bytes)}`).join(' · ') || '–'}
          </dd>
        </dl>
      </div>
      {vm.agent?.connected ? <RunCommand vm={vm.name} /> : null}
      {vm.state === 'running' ? (
        <div class="charts">
          <Chart title="CPU" series={[['CPU %', '#10a37f']]} data={[s.t, s.cpu]} format={(v) => `${v.toFixed(0)}%`} floor={10} />
          <Chart
            title="Memory"
            series={[['guest used', '#10a37f'], ['QEMU resident', '#6366f1'], ['allocated', '#94a3b8']]}
            data={[s.t, s.guest, s.mem, s.t.map(() => vm.memory_mib * 1024 * 1024)]}
            format={bytes}
            floor={64 * 1024 * 1024}
          />
          <Chart
            title="Disk"
            series={[['read', '#0ea5e9'], ['write', '#f59e0b']]}
            data={[s.t, s.diskR, s.diskW]}
            format={rate}
            floor={64 * 1024}
          />
          <Chart
            title="Network"
            series={[['in', '#22c55e'], ['out', '#ef4444']]}
            data={[s.t, s.netR, s.netS]}
            format={rate}
            floor={4 * 1024}
          />
        </div>
      ) : (
        <Empty title="No live figures">Charts appear while the VM runs.</Empty>
      )}
    </div>
  );
}

function agentText(agent) {
  if (!agent) return '–';
  if (!agent.connected) return 'not connected';
  const load = agent.load ? `load ${agent.load.map((l) => l.toFixed(2)).join(' ')}` : null;
  return [agent.version, agent.os, agent.hostname, load].filter(Boolean).join(' · ');
}

/** Base64 (from the API) as text, bytes that are not UTF-8 shown as such. */
function decode(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/** A shell command line run in the guest through its agent. */
function RunCommand({ vm }) {
  const [line, setLine] = useState('');
  const [result, setResult] = useState(null);
  const [busy, setBusy] = useState(false);
  const run = async (e) => {
    e.preventDefault();
    setBusy(true);
    try {
      const r = await post(`/vms/${enc(vm)}/exec`, { command: '/bin/sh', args: ['-c', line] });
      const code = r.exit_code ?? `signal ${r.signal}`;
      setResult({ ok: r.exit_code === 0, text: decode(r.stdout_b64) + decode(r.stderr_b64), code });
    } catch (err) {
      setResult({ ok: false, text: err.message, code: '–' });
    } finally {
      setBusy(false);
    }
  };
  return (
    <div class="card">
      <form class="run-command" onSubmit={run}>
        <label>
          Run in the guest
          <input class="mono" value={line} onInput={(e) => setLine(e.currentTarget.value)} placeholder="uname -a" />
        </label>
        <button type="submit" class="btn" disabled={busy || !line}>
          Run
        </button>
      </form>
      {result ? (
        <div data-testid="command-result">
          <p class={result.ok ? 'muted' : 'bad'}>exit {result.code}</p>
          <pre class="mono output">{result.text}</pre>
        </div>
      ) : null}
    </div>
  );
}

function Snapshots({ vm, onError }) {
  const [list, setList] = useState(null);
  const [name, setName] = useState('');
  const load = () => get(`/vms/${enc(vm.name)}/snapshots`).then(setList, (e) => onError(e.message));
  useEffect(() => {
    load();
    return onEvent((e) => {
      if (e.vm === vm.name) load();
    });
  }, [vm.name]);
  if (!list) return <Loading />;
  return (
    <div>
      <form
        class="toolbar"
        onSubmit={async (e) => {
          e.preventDefault();
          try {
            await post(`/vms/${enc(vm.name)}/snapshots`, { name: name || snapshotName() });
            setName('');
            load();
          } catch (err) {
            onError(err.message);
          }
        }}
      >
        <input
          aria-label="Snapshot name"
          placeholder={snapshotName()}
          value={name}
          onInput={(e) => setName(e.currentTarget.value)}
        />
        <button type="submit" class="btn primary">
          Take snapshot
        </button>
        <span class="muted small">
          {vm.state === 'running' || vm.state === 'paused' ? 'With memory: a revert resumes exactly here.' : 'Disk only (the VM is stopped).'}
        </span>
      </form>
      {list.snapshots.length === 0 ? (
        <Empty title="No snapshots">Take one before a risky change.</Empty>
      ) : (
        <div class="card flush">
          <table class="table" data-testid="snapshots">
            <thead>
              <tr>
                <th>Name</th>
                <th>Taken</th>
                <th>Kind</th>
                <th>Parent</th>
                <th>Actions</th>
              </tr>
            </thead>
            <tbody>
              {list.snapshots.map((snap) => (
                <tr key={snap.name} data-snapshot={snap.name}>
                  <td class="strong">
                    {snap.name} {list.current === snap.name ? <span class="badge">current</span> : null}
                  </td>
                  <td class="muted">{time(snap.created_at)}</td>
                  <td>{snap.with_memory ? 'disk + memory' : 'disk'}</td>
                  <td>{snap.parent ?? '–'}</td>
                  <td class="actions">
                    <ActionButton
                      kind="small"
                      aria-label={`Revert to ${snap.name}`}
                      action={async () => {
                        await post(`/vms/${enc(vm.name)}/snapshots/${enc(snap.name)}/revert`);
                        load();
                      }}
                      onError={onError}
                    >
                      Revert
                    </ActionButton>
                    <ActionButton
                      kind="small danger"
                      aria-label={`Delete snapshot ${snap.name}`}
                      action={async () => {
                        await del(`/vms/${enc(vm.name)}/snapshots/${enc(snap.name)}`);
                        load();
                      }}
                      onError={onError}
                    >
                      Delete
                    </ActionButton>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </div>
  );
}
